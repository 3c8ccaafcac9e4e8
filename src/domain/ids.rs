//! Validated identifiers. Every stored key is built from these, so validation here is what keeps
//! keys unambiguous: a namespace never contains the key separator `#`, and no id holds control
//! characters or exceeds what fits comfortably in a DynamoDB key (2 KB for the partition key).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest entity or resource id, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// The longest namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// An identifier that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes long, the maximum is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} {value:?} contains {ch:?}, which is not allowed here")]
    BadChar {
        field: &'static str,
        value: String,
        ch: char,
    },
}

fn check(
    field: &'static str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { field });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    match value.chars().find(|&c| !allowed(c)) {
        Some(ch) => Err(IdError::BadChar {
            field,
            value: value.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $allowed:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        /// Shared text: a clone (every key, record and message holds one) is a reference count,
        /// not a copy.
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// # Errors
            /// [`IdError`] naming the field when the value is empty, too long or has a bad character.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($field, &value, $max, $allowed)?;
                Ok(Self(value.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A tenant's namespace: `[a-z0-9_-]`, up to 64 bytes. It starts every stored key.
    Namespace,
    "namespace",
    MAX_NAMESPACE_LEN,
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
);
id_type!(
    /// An entity (API key, user, project, tenant): any printable text up to 256 bytes.
    EntityId,
    "entity_id",
    MAX_ID_LEN,
    |c: char| !c.is_control()
);
id_type!(
    /// A limited resource (a model, an endpoint): any printable text up to 256 bytes.
    ResourceId,
    "resource",
    MAX_ID_LEN,
    |c: char| !c.is_control()
);

impl Namespace {
    /// The namespace used when a caller names none.
    pub fn default_namespace() -> Self {
        Self("default".into())
    }
}

/// Where one bucket lives: one stored item per (namespace, entity, resource).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub namespace: Namespace,
    pub entity: EntityId,
    pub resource: ResourceId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated_with_the_field_named() {
        assert!(Namespace::new("tenant-a_1").is_ok());
        let err = Namespace::new("Tenant#1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "namespace \"Tenant#1\" contains 'T', which is not allowed here"
        );
        assert_eq!(
            EntityId::new("").unwrap_err().to_string(),
            "entity_id is empty"
        );
        assert!(matches!(
            ResourceId::new("x".repeat(257)),
            Err(IdError::TooLong {
                field: "resource",
                len: 257,
                ..
            })
        ));
        assert!(matches!(
            EntityId::new("a\nb"),
            Err(IdError::BadChar { ch: '\n', .. })
        ));
        assert!(EntityId::new("user@example.com/ключ#1").is_ok());
    }
}
