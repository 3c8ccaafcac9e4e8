use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use loona_hpack::{Decoder, Encoder};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::*;

const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const DATA: u8 = 0x0;

/// A client's bytes, handed out in the given read sizes (then the rest in one read).
struct Chunked {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = if self.sizes.is_empty() {
            usize::MAX
        } else {
            self.sizes.remove(0).max(1)
        };
        let n = want.min(buf.remaining()).min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

async fn through(data: Vec<u8>, sizes: Vec<usize>) -> io::Result<(Vec<u8>, bool)> {
    let mut conn = LocalAuthority::new(Chunked { data, at: 0, sizes });
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await?;
    Ok((out, conn.is_rewriting()))
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap();
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// How a client frames one header block.
#[derive(Debug, Clone)]
struct Framing {
    /// Bytes of HPACK per frame (the rest goes into CONTINUATION frames).
    split: usize,
    pad: Option<u8>,
    priority: bool,
}

impl Framing {
    fn plain() -> Self {
        Self {
            split: MAX_FRAME,
            pad: None,
            priority: false,
        }
    }
}

fn header_block(out: &mut Vec<u8>, stream: u32, block: &[u8], end_stream: bool, how: &Framing) {
    let pieces: Vec<&[u8]> = block.chunks(how.split.max(1)).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let mut flags = if i + 1 == pieces.len() {
            END_HEADERS
        } else {
            0
        };
        if i == 0 {
            let mut payload = Vec::new();
            if end_stream {
                flags |= END_STREAM;
            }
            if let Some(pad) = how.pad {
                flags |= PADDED;
                payload.push(pad);
            }
            if how.priority {
                flags |= PRIORITY;
                payload.extend_from_slice(&[0, 0, 0, 0, 15]);
            }
            payload.extend_from_slice(piece);
            payload.extend(std::iter::repeat_n(0, usize::from(how.pad.unwrap_or(0))));
            frame(out, HEADERS, flags, stream, &payload);
        } else {
            frame(out, CONTINUATION, flags, stream, piece);
        }
    }
}

type Request = Vec<(Vec<u8>, Vec<u8>)>;

fn request(authority: &str, extra: &[(&str, String)]) -> Request {
    let mut fields = vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b":path".to_vec(), b"/grpc.health.v1.Health/Check".to_vec()),
        (b":authority".to_vec(), authority.as_bytes().to_vec()),
        (b"te".to_vec(), b"trailers".to_vec()),
        (b"content-type".to_vec(), b"application/grpc".to_vec()),
    ];
    for (name, value) in extra {
        fields.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
    }
    fields
}

/// What a client sends: preface, SETTINGS, then per request a header block and a DATA frame. The
/// encoder indexes (the dynamic table is shared by the blocks, as with real clients).
fn client(requests: &[(Request, Framing)]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0]);
    let mut encoder = Encoder::new();
    for (i, (fields, how)) in requests.iter().enumerate() {
        let stream = 1 + 2 * u32::try_from(i).unwrap();
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        header_block(&mut out, stream, &block, false, how);
        frame(&mut out, DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]);
    }
    out
}

#[derive(Debug, PartialEq)]
enum Seen {
    Preface,
    Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        fields: Request,
    },
}

/// Parses what the server would read, decoding header blocks as the server does.
fn server_view(bytes: &[u8]) -> Vec<Seen> {
    assert_eq!(
        &bytes[..PREFACE_LEN],
        PREFACE,
        "the preface is passed first"
    );
    let mut seen = vec![Seen::Preface];
    let mut decoder = Decoder::new();
    let mut rest = &bytes[PREFACE_LEN..];
    let mut block: Option<(u32, bool, Vec<u8>)> = None;
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        assert!(len <= MAX_FRAME, "a frame over the server's frame size");
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
        let payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match kind {
            HEADERS | CONTINUATION => {
                let fragment = fragment(kind, flags, payload).unwrap();
                let entry = block.get_or_insert((stream, flags & END_STREAM != 0, Vec::new()));
                entry.2.extend_from_slice(fragment);
                if flags & END_HEADERS != 0 {
                    let (stream, end_stream, hpack) = block.take().unwrap();
                    let fields = decoder
                        .decode(&hpack)
                        .expect("the server can decode every block");
                    seen.push(Seen::Headers {
                        stream,
                        end_stream,
                        fields,
                    });
                }
            }
            _ => seen.push(Seen::Frame {
                kind,
                flags,
                stream,
                payload: payload.to_vec(),
            }),
        }
    }
    seen
}

fn with_authority(fields: &Request, authority: &[u8]) -> Request {
    fields
        .iter()
        .map(|(n, v)| {
            if n == b":authority" {
                (n.clone(), authority.to_vec())
            } else {
                (n.clone(), v.clone())
            }
        })
        .collect()
}

#[tokio::test]
async fn an_authority_the_server_accepts_passes_through_byte_for_byte() {
    let requests = vec![
        (request("localhost", &[]), Framing::plain()),
        (request("localhost", &[]), Framing::plain()),
    ];
    let sent = client(&requests);
    let (out, rewriting) = through(sent.clone(), vec![7, 3, 50]).await.unwrap();
    assert_eq!(out, sent);
    assert!(!rewriting);
}

#[tokio::test]
async fn a_socket_path_authority_is_replaced_in_every_block() {
    // What gRPC's C core sends for `unix:/tmp/zl.sock`; the second request refers to the first
    // one's fields through the client's dynamic table.
    let requests = vec![
        (request("tmp%2Fzl.sock", &[]), Framing::plain()),
        (
            request("tmp%2Fzl.sock", &[("x-trace", "2".into())]),
            Framing::plain(),
        ),
        (request("tmp%2Fzl.sock", &[]), Framing::plain()),
    ];
    let sent = client(&requests);
    let (out, rewriting) = through(sent.clone(), vec![]).await.unwrap();
    assert!(rewriting);
    let expected = server_view(&sent)
        .into_iter()
        .map(|s| match s {
            Seen::Headers {
                stream,
                end_stream,
                fields,
            } => Seen::Headers {
                stream,
                end_stream,
                fields: with_authority(&fields, LOCAL_AUTHORITY),
            },
            other => other,
        })
        .collect::<Vec<_>>();
    assert_eq!(server_view(&out), expected);
}

#[tokio::test]
async fn a_block_with_no_authority_is_passed_on() {
    let fields: Request = request("x", &[])
        .into_iter()
        .filter(|(n, _)| n != b":authority")
        .collect();
    let sent = client(&[(fields, Framing::plain())]);
    let (out, rewriting) = through(sent.clone(), vec![]).await.unwrap();
    assert_eq!(out, sent);
    assert!(!rewriting);
}

#[tokio::test]
async fn broken_header_blocks_end_the_connection_without_a_panic() {
    let mut garbage = PREFACE.to_vec();
    frame(
        &mut garbage,
        HEADERS,
        END_HEADERS,
        1,
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    );
    assert!(through(garbage, vec![]).await.is_err());

    let mut interrupted = PREFACE.to_vec();
    frame(&mut interrupted, HEADERS, 0, 1, &[0x82]);
    frame(&mut interrupted, DATA, 0, 1, &[]);
    assert!(through(interrupted, vec![]).await.is_err());

    let mut elsewhere = PREFACE.to_vec();
    frame(&mut elsewhere, HEADERS, 0, 1, &[0x82]);
    frame(&mut elsewhere, CONTINUATION, END_HEADERS, 3, &[0x84]);
    assert!(through(elsewhere, vec![]).await.is_err());

    let mut overpadded = PREFACE.to_vec();
    frame(
        &mut overpadded,
        HEADERS,
        END_HEADERS | PADDED,
        1,
        &[9, 0x82],
    );
    assert!(through(overpadded, vec![]).await.is_err());
}

#[test]
fn long_strings_use_the_multi_byte_length() {
    for len in [0, 1, 126, 127, 128, 255, 16_383, 16_384, 70_000] {
        let value = vec![b'v'; len];
        let mut out = BytesMut::new();
        encode_literal(&mut out, b"x-long", &value);
        let fields = Decoder::new().decode(&out).unwrap();
        assert_eq!(fields, vec![(b"x-long".to_vec(), value)]);
    }
}

fn framing() -> impl Strategy<Value = Framing> {
    (1usize..64, proptest::option::of(0u8..20), any::<bool>()).prop_map(|(split, pad, priority)| {
        Framing {
            split,
            pad,
            priority,
        }
    })
}

fn authority() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("localhost".to_string()),
        Just("tmp%2Fzl.sock".to_string()),
        Just("/tmp/zl.sock".to_string()),
        "[a-z%/:.]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// However the client frames and indexes its headers and however the socket splits its bytes,
    /// the server reads the same requests, with `localhost` wherever it would refuse the authority
    /// (or byte-for-byte what was sent, when the first request's authority was fine), and every
    /// other frame unchanged and in order.
    #[test]
    fn the_server_reads_what_the_client_meant(
        requests in proptest::collection::vec(
            (authority(), proptest::collection::vec(("x-[a-z]{1,6}", "[ -~]{0,40}"), 0..4),
             proptest::option::of(0usize..40_000), framing()),
            1..5,
        ),
        sizes in proptest::collection::vec(1usize..200, 0..40),
    ) {
        let requests: Vec<(Request, Framing)> = requests
            .into_iter()
            .map(|(authority, extra, long, how)| {
                let mut extra: Vec<(&str, String)> =
                    extra.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
                if let Some(len) = long {
                    extra.push(("x-long", "l".repeat(len)));
                }
                (request(&authority, &extra), how)
            })
            .collect();
        let sent = client(&requests);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (out, rewriting) = runtime.block_on(through(sent.clone(), sizes)).unwrap();
        let first_ok = is_acceptable(&requests[0].0[3].1);
        prop_assert_eq!(rewriting, !first_ok);
        let expected: Vec<Seen> = server_view(&sent)
            .into_iter()
            .map(|s| match s {
                Seen::Headers { stream, end_stream, fields } if rewriting => {
                    let fixed = fields
                        .iter()
                        .map(|(n, v)| {
                            if n == b":authority" && !is_acceptable(v) {
                                (n.clone(), LOCAL_AUTHORITY.to_vec())
                            } else {
                                (n.clone(), v.clone())
                            }
                        })
                        .collect();
                    Seen::Headers { stream, end_stream, fields: fixed }
                }
                other => other,
            })
            .collect();
        if rewriting {
            prop_assert_eq!(server_view(&out), expected);
        } else {
            prop_assert_eq!(out, sent);
        }
    }
}
