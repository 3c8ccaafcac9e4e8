//! Milli-token amounts per limit, summed with checked arithmetic.
//!
//! Every amount that comes from the network is added up somewhere: a lease's adjustments, the
//! acquires of one batch, the refunds of one settle write. [`Amounts`] is the one place that adds
//! them, and it refuses (rather than wraps) a sum that leaves `i64`. The bounds below keep every
//! stored balance and total readable by every daemon: a write that would pass them is refused
//! before it is sent.

use super::limit::{Limit, LimitName, MAX_TOKENS, MILLI};

/// The most one request, adjustment or lease may consume of one limit: the largest capacity.
pub const MAX_AMOUNT: i64 = MAX_TOKENS as i64 * MILLI;

/// The deepest debt a stored balance may reach (adjustments past it are refused with
/// `OUT_OF_RANGE`): four times the largest capacity, far inside `i64`.
pub const MIN_BALANCE: i64 = -4 * MAX_AMOUNT;

/// A sum left the representable range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the total for limit \"{name}\" would be out of range")]
pub struct Overflow {
    pub name: LimitName,
}

/// A request that names a limit none of the buckets it charges has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown limit {0:?}: the request consumes from a limit that is not configured")]
pub struct UnknownLimit(pub String);

/// Checks that every name of `amounts` is a limit of one of `sets`: the limit sets of the
/// buckets a request charges (an entity's and, when it cascades, its parent's). The one check of
/// a request's names, made where the request comes in: the Python zae-limiter's rule, a name is
/// known when the entity or its cascade parent has that limit.
///
/// # Errors
/// [`UnknownLimit`] naming the first name no set has.
pub fn check_names(amounts: &[(LimitName, i64)], sets: &[&[Limit]]) -> Result<(), UnknownLimit> {
    match amounts
        .iter()
        .find(|(name, _)| !sets.iter().any(|s| s.iter().any(|l| l.name() == name)))
    {
        Some((name, _)) => Err(UnknownLimit(name.to_string())),
        None => Ok(()),
    }
}

/// Milli-tokens per limit name, in name order, each name once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Amounts(Vec<(LimitName, i64)>);

impl Amounts {
    /// Merges `pairs` (a name given twice is summed).
    ///
    /// # Errors
    /// [`Overflow`] when a name's sum leaves `i64`.
    pub fn new(pairs: impl IntoIterator<Item = (LimitName, i64)>) -> Result<Self, Overflow> {
        let mut out = Self::default();
        for (name, amount) in pairs {
            out.add_one(&name, amount)?;
        }
        Ok(out)
    }

    pub fn as_slice(&self) -> &[(LimitName, i64)] {
        &self.0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&LimitName, i64)> {
        self.0.iter().map(|(n, a)| (n, *a))
    }

    /// The amount for `name` (0 when absent).
    pub fn get(&self, name: &LimitName) -> i64 {
        self.0
            .binary_search_by(|(n, _)| n.cmp(name))
            .map_or(0, |i| self.0[i].1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every amount is zero (nothing to write).
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|(_, a)| *a == 0)
    }

    /// `self + other`, name by name.
    ///
    /// # Errors
    /// [`Overflow`] (and `self` unchanged) when a sum leaves `i64`.
    pub fn try_add(&mut self, other: &Self) -> Result<(), Overflow> {
        // Check every sum first, so a refusal changes nothing (and the common case allocates
        // nothing beyond new names).
        if let Some((name, _)) = other
            .iter()
            .find(|(name, amount)| self.get(name).checked_add(*amount).is_none())
        {
            return Err(Overflow { name: name.clone() });
        }
        for (name, amount) in other.iter() {
            self.add_one(name, amount)
                .expect("every sum was checked above");
        }
        Ok(())
    }

    /// `-self` (every amount of a valid request is within ±[`MAX_AMOUNT`], so this cannot fail
    /// for them; a value of `i64::MIN` is refused).
    ///
    /// # Errors
    /// [`Overflow`] for an amount of `i64::MIN`.
    pub fn negated(&self) -> Result<Self, Overflow> {
        self.0
            .iter()
            .map(|(n, a)| {
                a.checked_neg()
                    .map(|a| (n.clone(), a))
                    .ok_or_else(|| Overflow { name: n.clone() })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// The share of one bucket: the amounts of the limits it has (`limits`).
    pub fn share(&self, limits: &[Limit]) -> Self {
        self.only(|n| limits.iter().any(|l| l.name() == n))
    }

    /// Only the amounts whose name `keep` accepts.
    pub fn only(&self, keep: impl Fn(&LimitName) -> bool) -> Self {
        Self(self.0.iter().filter(|(n, _)| keep(n)).cloned().collect())
    }

    /// Without the zero amounts.
    pub fn nonzero(&self) -> Self {
        self.only_values(|a| a != 0)
    }

    fn only_values(&self, keep: impl Fn(i64) -> bool) -> Self {
        Self(self.0.iter().filter(|(_, a)| keep(*a)).cloned().collect())
    }

    fn add_one(&mut self, name: &LimitName, amount: i64) -> Result<(), Overflow> {
        match self.0.binary_search_by(|(n, _)| n.cmp(name)) {
            Ok(i) => {
                self.0[i].1 = self.0[i]
                    .1
                    .checked_add(amount)
                    .ok_or_else(|| Overflow { name: name.clone() })?;
            }
            Err(i) => self.0.insert(i, (name.clone(), amount)),
        }
        Ok(())
    }
}

impl std::ops::Deref for Amounts {
    type Target = [(LimitName, i64)];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> LimitName {
        LimitName::new(s).unwrap()
    }

    #[test]
    fn merges_sorts_and_sums_checked() {
        let a = Amounts::new([(name("tpm"), 5), (name("rpm"), 1), (name("tpm"), 2)]).unwrap();
        assert_eq!(a.as_slice(), &[(name("rpm"), 1), (name("tpm"), 7)]);
        assert_eq!(a.get(&name("tpm")), 7);
        assert_eq!(a.get(&name("none")), 0);
        let mut b = a.clone();
        let big = Amounts::new([(name("tpm"), i64::MAX)]).unwrap();
        assert_eq!(b.try_add(&big), Err(Overflow { name: name("tpm") }));
        assert_eq!(b, a, "a refused sum changes nothing");
        assert!(
            Amounts::new([(name("x"), i64::MIN)])
                .unwrap()
                .negated()
                .is_err()
        );
        assert_eq!(
            a.negated().unwrap().as_slice(),
            &[(name("rpm"), -1), (name("tpm"), -7)]
        );
    }
}
