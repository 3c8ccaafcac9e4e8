//! Stock gRPC clients on the Unix socket.
//!
//! gRPC's C core (Python's `grpcio`, Ruby, PHP, C++, C#) and grpc-java send the socket path as the
//! HTTP/2 `:authority` of every request (`unix:/tmp/zae-limiter.sock` becomes
//! `tmp%2Fzae-limiter.sock`). The HTTP/2 server under tonic refuses an authority it cannot parse as
//! a URI authority and resets the stream (hyperium/h2 pull request 487, open upstream), so those
//! clients get `INTERNAL: Stream removed` on every call unless they set `grpc.default_authority`.
//!
//! [`LocalAuthority`] sits between an accepted connection and the server and reads what the client
//! sends. Frames pass unchanged until the first header block is complete; that block is decoded
//! (HPACK). When its `:authority` is absent or one the server accepts, the block and everything
//! after it pass through untouched: clients that send `localhost` (our Rust client, grpc-go,
//! grpcurl) pay nothing more. Otherwise the connection is rewritten from then on: every header block
//! the client sends is decoded with the client's compression state and sent on re-encoded as plain
//! literals (no table the server must keep in step), with an unparsable `:authority` replaced by
//! `localhost`. Only header blocks change; the server's answers are not touched. The authority means
//! nothing on a Unix socket: the daemon routes by path and decides access by peer credentials.
//!
//! Decision: an adapter of our own rather than a patched copy of `h2` carried in the repository: it
//! is small, tested on its own, and does not need redoing at each `h2` release. If upstream accepts
//! such authorities one day, this module can go.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, BytesMut};
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What replaces an authority the server would refuse.
pub const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// The client connection preface (`PRI * HTTP/2.0 ...`), passed on as it is.
const PREFACE_LEN: usize = 24;
const FRAME_HEAD_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The server's SETTINGS_MAX_FRAME_SIZE: the protocol's default, which tonic keeps.
const MAX_FRAME: usize = 16_384;
/// The server's SETTINGS_HEADER_TABLE_SIZE: the protocol's default.
const HEADER_TABLE_SIZE: usize = 4_096;
/// A header block larger than this closes the connection (the server takes far less).
const MAX_BLOCK: usize = 1 << 20;

/// Whether the server would accept this `:authority`.
#[must_use]
pub fn is_acceptable(authority: &[u8]) -> bool {
    http::uri::Authority::try_from(authority).is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first complete header block.
    Sniff,
    /// The client's authority is fine: bytes pass untouched.
    Pass,
    /// Every header block is decoded and re-encoded.
    Rewrite,
}

/// A header block being collected (a HEADERS frame and its CONTINUATION frames).
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    /// The HPACK fragments, without padding and priority fields.
    fragments: BytesMut,
    /// The frames as received, for passing on unchanged.
    raw: BytesMut,
}

/// A connection whose client header blocks carry an authority the server accepts (see the module
/// documentation). Writes pass through unchanged.
pub struct LocalAuthority<S> {
    inner: S,
    mode: Mode,
    decoder: Decoder<'static>,
    /// Preface bytes still to pass on.
    preface_left: usize,
    /// Payload bytes of a passed-through frame still to pass on.
    forward_left: usize,
    block: Option<Block>,
    /// Read from the client, not yet looked at.
    input: BytesMut,
    /// Ready for the server.
    output: BytesMut,
}

impl<S> std::fmt::Debug for LocalAuthority<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAuthority")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<S> LocalAuthority<S> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub fn new(inner: S) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            inner,
            mode: Mode::Sniff,
            decoder,
            preface_left: PREFACE_LEN,
            forward_left: 0,
            block: None,
            input: BytesMut::new(),
            output: BytesMut::new(),
        }
    }

    /// Whether this connection's header blocks are being rewritten.
    pub fn is_rewriting(&self) -> bool {
        self.mode == Mode::Rewrite
    }

    /// Moves what can be decided from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.mode == Mode::Pass {
                let rest = self.input.split();
                self.output.unsplit(rest);
                return Ok(());
            }
            if self.preface_left > 0 || self.forward_left > 0 {
                let left = self.preface_left.max(self.forward_left);
                let n = left.min(self.input.len());
                if n == 0 {
                    return Ok(());
                }
                let passed = self.input.split_to(n);
                self.output.unsplit(passed);
                if self.preface_left > 0 {
                    self.preface_left -= n;
                } else {
                    self.forward_left -= n;
                }
                continue;
            }
            let Some(head) = self.input.get(..FRAME_HEAD_LEN) else {
                return Ok(());
            };
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let in_block = self.block.is_some();
            match kind {
                HEADERS if !in_block => {}
                CONTINUATION if in_block => {}
                _ if in_block => return Err(invalid("header block interrupted by another frame")),
                _ => {
                    // Not ours to look at: pass the frame on as it comes.
                    let passed = self.input.split_to(FRAME_HEAD_LEN);
                    self.output.unsplit(passed);
                    self.forward_left = len;
                    continue;
                }
            }
            if len > MAX_BLOCK {
                return Err(invalid("header block too large"));
            }
            if self.input.len() < FRAME_HEAD_LEN + len {
                return Ok(());
            }
            let frame = self.input.split_to(FRAME_HEAD_LEN + len);
            let fragment = fragment(kind, flags, &frame[FRAME_HEAD_LEN..])?;
            let block = self.block.get_or_insert_with(|| Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                fragments: BytesMut::new(),
                raw: BytesMut::new(),
            });
            if block.stream != stream {
                return Err(invalid("CONTINUATION on another stream"));
            }
            block.fragments.extend_from_slice(fragment);
            block.raw.unsplit(frame);
            if block.fragments.len() > MAX_BLOCK {
                return Err(invalid("header block too large"));
            }
            if flags & END_HEADERS != 0 {
                let block = self.block.take().expect("a block was just filled");
                self.finish(block)?;
            }
        }
    }

    /// A complete header block: decide the mode (first block) and pass it on.
    fn finish(&mut self, block: Block) -> io::Result<()> {
        let headers = decode(&mut self.decoder, &block.fragments)?;
        let refused = headers
            .iter()
            .any(|(name, value)| name == b":authority" && !is_acceptable(value));
        if self.mode == Mode::Sniff && !refused {
            self.mode = Mode::Pass;
            self.output.unsplit(block.raw);
            return Ok(());
        }
        self.mode = Mode::Rewrite;
        let mut encoded = BytesMut::with_capacity(block.fragments.len() + 64);
        for (name, value) in &headers {
            let value = if name == b":authority" && !is_acceptable(value) {
                LOCAL_AUTHORITY
            } else {
                value.as_slice()
            };
            encode_literal(&mut encoded, name, value);
        }
        put_frames(&mut self.output, block.stream, block.end_stream, &encoded);
        Ok(())
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2: {what}"))
}

/// The HPACK fragment of a HEADERS or CONTINUATION payload: padding and priority fields removed.
fn fragment(kind: u8, flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    if kind != HEADERS {
        return Ok(payload);
    }
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = body
            .split_first()
            .ok_or_else(|| invalid("padded HEADERS without a pad length"))?;
        pad = usize::from(n);
        body = rest;
    }
    if flags & PRIORITY != 0 {
        body = body
            .get(5..)
            .ok_or_else(|| invalid("HEADERS too short for its priority"))?;
    }
    let end = body
        .len()
        .checked_sub(pad)
        .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;
    Ok(&body[..end])
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Decodes a header block; a decoder panic on hostile input is an error, not a crashed task.
fn decode(decoder: &mut Decoder<'static>, block: &[u8]) -> io::Result<Fields> {
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut fields = Vec::new();
        decoder
            .decode_with_cb(block, |name, value| {
                fields.push((name.into_owned(), value.into_owned()));
            })
            .map(|()| fields)
    }));
    match decoded {
        Ok(Ok(fields)) => Ok(fields),
        Ok(Err(e)) => Err(invalid(&format!("header block does not decode: {e:?}"))),
        Err(_) => Err(invalid("header block does not decode")),
    }
}

/// A literal header field without indexing, with a literal name (RFC 7541, 6.2.2): the server's
/// decoder needs no table to read it.
fn encode_literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0);
    encode_string(out, name);
    encode_string(out, value);
}

/// A string literal without Huffman coding: its length (7-bit prefix integer), then its bytes.
fn encode_string(out: &mut BytesMut, s: &[u8]) {
    const PREFIX_MAX: usize = 0x7f;
    if s.len() < PREFIX_MAX {
        out.put_u8(u8::try_from(s.len()).expect("below the 7-bit prefix"));
    } else {
        out.put_u8(0x7f);
        let mut rest = s.len() - PREFIX_MAX;
        while rest >= 0x80 {
            out.put_u8(u8::try_from(rest & 0x7f).expect("seven bits") | 0x80);
            rest >>= 7;
        }
        out.put_u8(u8::try_from(rest).expect("below 0x80"));
    }
    out.extend_from_slice(s);
}

/// A header block as a HEADERS frame and as many CONTINUATION frames as the frame size needs.
fn put_frames(out: &mut BytesMut, stream: u32, end_stream: bool, block: &[u8]) {
    let chunks: Vec<&[u8]> = if block.is_empty() {
        vec![block]
    } else {
        block.chunks(MAX_FRAME).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = 0;
        if i == 0 && end_stream {
            flags |= END_STREAM;
        }
        if i == last {
            flags |= END_HEADERS;
        }
        let len = u32::try_from(chunk.len()).expect("a chunk is at most MAX_FRAME");
        out.put_slice(&len.to_be_bytes()[1..]);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
        out.put_slice(chunk);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LocalAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = buf.remaining().min(this.output.len());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Pass && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.input.reserve(8 * 1024);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.input
            ))?;
            if n == 0 {
                // End of the connection: a partial frame is not passed on.
                return Poll::Ready(Ok(()));
            }
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LocalAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for LocalAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
