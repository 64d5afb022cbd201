//! Store (xenstore-like) wire protocol: the request and response messages a
//! client and the store daemon exchange over a byte ring, their framing
//! (`u16` little-endian length + postcard payload), and store path rules.
//!
//! A client sends `Envelope<Request>`; the store answers each with an
//! `Envelope<Response>` carrying the same `req_id`. Watch events arrive
//! unsolicited as `Envelope { req_id: 0, body: Response::WatchEvent { .. } }`.
//! The receiver of a frame trusts nothing in it: oversize lengths and
//! undecodable payloads are errors, never panics or unbounded buffering.

use crate::{DomId, Errno};
use alloc::string::String;
use alloc::vec::Vec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest store path, in bytes.
pub const MAX_PATH_LEN: usize = 256;
/// Bytes of the length prefix in front of every frame.
pub const FRAME_HEADER_LEN: usize = 2;
/// Longest whole frame (length prefix + payload).
pub const MAX_FRAME: usize = 4000;
/// Longest payload a frame may carry.
pub const MAX_PAYLOAD: usize = MAX_FRAME - FRAME_HEADER_LEN;
/// `req_id` of unsolicited watch events.
pub const WATCH_EVENT_REQ_ID: u32 = 0;

/// A request to the store. Paths are absolute (see [`validate_path`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Read a node's value. Answer: `Value`.
    Read { path: String },
    /// Create or overwrite a node (and missing parents). Answer: `Ok`.
    Write { path: String, value: Vec<u8> },
    /// Create an empty node if missing. Answer: `Ok`.
    Mkdir { path: String },
    /// Remove a node and everything below it. Answer: `Ok`.
    Remove { path: String },
    /// List a node's children (names only). Answer: `List`.
    Directory { path: String },
    /// Watch `path` and everything below it; events carry `token`.
    /// Answer: `Ok`, then a first `WatchEvent` for `path` itself.
    Watch { path: String, token: String },
    /// Remove the watch set with the same `path` and `token`. Answer: `Ok`.
    Unwatch { path: String, token: String },
    /// Set a node's owner and the domains that may read it. Answer: `Ok`.
    SetPerms { path: String, owner: u16, readers: Vec<u16> },
    /// The home path of domain `domid`. Answer: `Path`.
    GetDomainPath { domid: u16 },
}

impl Request {
    /// The path the request names, if any.
    pub fn path(&self) -> Option<&str> {
        match self {
            Request::Read { path }
            | Request::Write { path, .. }
            | Request::Mkdir { path }
            | Request::Remove { path }
            | Request::Directory { path }
            | Request::Watch { path, .. }
            | Request::Unwatch { path, .. }
            | Request::SetPerms { path, .. } => Some(path),
            Request::GetDomainPath { .. } => None,
        }
    }
}

/// The store's answer to a request, or a watch event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done, nothing to return.
    Ok,
    /// A node's value.
    Value(Vec<u8>),
    /// A node's children.
    List(Vec<String>),
    /// A path (answer to `GetDomainPath`).
    Path(String),
    /// Failure: a negative errno value (an [`Errno`]'s `.0`).
    Error(i64),
    /// `path` changed under a watch set with `token`.
    WatchEvent { path: String, token: String },
}

impl Response {
    /// The error this response carries, if it is `Error`.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Response::Error(e) => Some(Errno(*e)),
            _ => None,
        }
    }
}

impl From<Errno> for Response {
    fn from(e: Errno) -> Response {
        Response::Error(e.0)
    }
}

/// A message with its request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Chosen by the client; echoed in the answer.
    pub req_id: u32,
    pub body: T,
}

/// A request as sent by a client.
pub type RequestMsg = Envelope<Request>;
/// An answer or watch event as sent by the store.
pub type ResponseMsg = Envelope<Response>;

/// Encodes `msg` as one frame: `u16` little-endian payload length, then the
/// postcard payload. `E2BIG` if the payload exceeds [`MAX_PAYLOAD`],
/// `EINVAL` if it cannot be serialised.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, Errno> {
    let mut out = postcard::to_extend(msg, alloc::vec![0u8; FRAME_HEADER_LEN]).map_err(|_| Errno::EINVAL)?;
    let len = out.len() - FRAME_HEADER_LEN;
    if len > MAX_PAYLOAD {
        return Err(Errno::E2BIG);
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&(len as u16).to_le_bytes());
    Ok(out)
}

/// Decodes a frame payload (as yielded by [`FrameDecoder`]). `EINVAL` if it
/// is not exactly one valid `T`.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Errno> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(Errno::EINVAL),
    }
}

/// Reassembles frames from a byte stream that arrives in arbitrary pieces.
///
/// It buffers at most one frame ([`MAX_FRAME`] bytes). A length prefix above
/// [`MAX_PAYLOAD`] means the peer is broken or hostile: the decoder returns
/// `E2BIG` and keeps returning it until [`reset`](Self::reset), since the
/// stream can no longer be resynchronised.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    payload: Vec<u8>,
    broken: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub const fn new() -> Self {
        FrameDecoder { header: [0; FRAME_HEADER_LEN], header_len: 0, payload: Vec::new(), broken: false }
    }

    /// Consumes bytes from the front of `input` until one frame is complete
    /// and returns its payload, or until `input` is empty (`Ok(None)`; the
    /// partial frame stays buffered). Call again while `input` is non-empty.
    pub fn next_frame(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, Errno> {
        if self.broken {
            return Err(Errno::E2BIG);
        }
        if self.header_len < FRAME_HEADER_LEN {
            let n = (FRAME_HEADER_LEN - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
            self.header_len += n;
            *input = &input[n..];
            if self.header_len < FRAME_HEADER_LEN {
                return Ok(None);
            }
            if self.expected() > MAX_PAYLOAD {
                self.broken = true;
                return Err(Errno::E2BIG);
            }
        }
        let n = (self.expected() - self.payload.len()).min(input.len());
        self.payload.extend_from_slice(&input[..n]);
        *input = &input[n..];
        if self.payload.len() < self.expected() {
            return Ok(None);
        }
        self.header_len = 0;
        Ok(Some(core::mem::take(&mut self.payload)))
    }

    /// Feeds `data` and returns every frame it completes, in order.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<Vec<u8>>, Errno> {
        let mut frames = Vec::new();
        loop {
            match self.next_frame(&mut data)? {
                Some(f) => frames.push(f),
                None if data.is_empty() => return Ok(frames),
                None => {}
            }
        }
    }

    /// Bytes of the current partial frame held (prefix included).
    pub fn buffered(&self) -> usize {
        self.header_len + self.payload.len()
    }

    /// Whether an oversize frame broke the stream.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Drops any partial frame and the broken mark (e.g. after the peer
    /// reconnected).
    pub fn reset(&mut self) {
        *self = FrameDecoder::new();
    }

    fn expected(&self) -> usize {
        u16::from_le_bytes(self.header) as usize
    }
}

/// The home path of domain `domid`: `/local/domain/<id>`.
pub fn domain_path(domid: DomId) -> String {
    alloc::format!("/local/domain/{}", domid.0)
}

/// Checks a store path: absolute, at most [`MAX_PATH_LEN`] bytes, printable
/// ASCII without spaces, no empty, `.` or `..` components. `/` alone (the
/// root) is valid; a trailing `/` is not. `EINVAL` otherwise.
pub fn validate_path(path: &str) -> Result<(), Errno> {
    if path.len() > MAX_PATH_LEN || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Errno::EINVAL);
    }
    let rest = path.strip_prefix('/').ok_or(Errno::EINVAL)?;
    if rest.is_empty() {
        return Ok(());
    }
    if rest.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    fn samples() -> Vec<RequestMsg> {
        let reqs = vec![
            Request::Read { path: "/local/domain/1/name".into() },
            Request::Write { path: "/a/b".into(), value: b"4".to_vec() },
            Request::Mkdir { path: "/a".into() },
            Request::Remove { path: "/a".into() },
            Request::Directory { path: "/".into() },
            Request::Watch { path: "/a".into(), token: "tok".into() },
            Request::Unwatch { path: "/a".into(), token: "tok".into() },
            Request::SetPerms { path: "/a".into(), owner: 1, readers: vec![0, 2] },
            Request::GetDomainPath { domid: 7 },
        ];
        reqs.into_iter().enumerate().map(|(i, body)| Envelope { req_id: i as u32 + 1, body }).collect()
    }

    fn responses() -> Vec<ResponseMsg> {
        [
            Response::Ok,
            Response::Value(vec![0, 255, 1]),
            Response::List(vec!["a".into(), "bb".into()]),
            Response::Path("/local/domain/3".into()),
            Response::from(Errno::ENOENT),
            Response::WatchEvent { path: "/a/b".into(), token: "t".into() },
        ]
        .into_iter()
        .map(|body| Envelope { req_id: 9, body })
        .collect()
    }

    #[test]
    fn messages_round_trip() {
        for m in samples() {
            let f = encode_frame(&m).unwrap();
            let len = u16::from_le_bytes([f[0], f[1]]) as usize;
            assert_eq!(len, f.len() - 2);
            assert_eq!(decode_payload::<RequestMsg>(&f[2..]), Ok(m));
        }
        for m in responses() {
            let f = encode_frame(&m).unwrap();
            assert_eq!(decode_payload::<ResponseMsg>(&f[2..]), Ok(m));
        }
        assert_eq!(Response::Error(Errno::ENOENT.0).errno(), Some(Errno::ENOENT));
        assert_eq!(Response::Ok.errno(), None);
    }

    #[test]
    fn oversize_messages_are_refused() {
        let body = Request::Write { path: "/a".into(), value: vec![0; MAX_PAYLOAD] };
        assert_eq!(encode_frame(&Envelope { req_id: 1, body }), Err(Errno::E2BIG));
        // The largest value that fits.
        let fits = |n| encode_frame(&Envelope { req_id: 1, body: Request::Write { path: "/a".into(), value: vec![0; n] } });
        let mut n = MAX_PAYLOAD - 16;
        while fits(n + 1).is_ok() {
            n += 1;
        }
        assert_eq!(fits(n).unwrap().len(), MAX_FRAME);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let f = encode_frame(&Envelope { req_id: 1, body: Response::Ok }).unwrap();
        let mut p = f[2..].to_vec();
        p.push(0);
        assert_eq!(decode_payload::<ResponseMsg>(&p), Err(Errno::EINVAL));
        assert_eq!(decode_payload::<ResponseMsg>(&[]), Err(Errno::EINVAL));
    }

    #[test]
    fn decoder_reassembles_byte_by_byte() {
        let mut stream = Vec::new();
        for m in samples() {
            stream.extend(encode_frame(&m).unwrap());
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            got.extend(d.push(core::slice::from_ref(b)).unwrap());
        }
        assert_eq!(d.buffered(), 0);
        let got: Vec<RequestMsg> = got.iter().map(|p| decode_payload(p).unwrap()).collect();
        assert_eq!(got, samples());
        // All at once.
        let frames = d.push(&stream).unwrap();
        assert_eq!(frames.len(), samples().len());
    }

    #[test]
    fn next_frame_stops_after_one_frame() {
        let a = encode_frame(&Envelope { req_id: 1, body: Response::Ok }).unwrap();
        let b = encode_frame(&Envelope { req_id: 2, body: Response::Ok }).unwrap();
        let stream = [a.clone(), b].concat();
        let mut input = &stream[..];
        let mut d = FrameDecoder::new();
        assert_eq!(d.next_frame(&mut input).unwrap().as_deref(), Some(&a[2..]));
        assert_eq!(input.len(), stream.len() - a.len());
        assert!(d.next_frame(&mut input).unwrap().is_some());
        assert!(input.is_empty());
        assert_eq!(d.next_frame(&mut input), Ok(None));
        // A zero-length frame is a (empty) frame.
        assert_eq!(d.push(&[0, 0]).unwrap(), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn oversize_length_breaks_the_stream() {
        let mut d = FrameDecoder::new();
        let len = (MAX_PAYLOAD as u16 + 1).to_le_bytes();
        assert_eq!(d.push(&[len[0]]), Ok(vec![]));
        assert_eq!(d.push(&[len[1], 1, 2, 3]), Err(Errno::E2BIG));
        assert!(d.is_broken());
        assert_eq!(d.push(&[0, 0]), Err(Errno::E2BIG));
        d.reset();
        assert_eq!(d.push(&[1, 0, 42]), Ok(vec![vec![42]]));
        // The maximum is accepted.
        let mut frame = (MAX_PAYLOAD as u16).to_le_bytes().to_vec();
        frame.resize(MAX_FRAME, 7);
        assert_eq!(d.push(&frame).unwrap().len(), 1);
        assert_eq!(d.push(&[0xff, 0xff]), Err(Errno::E2BIG));
    }

    #[test]
    fn domain_paths() {
        assert_eq!(domain_path(DomId(0)), "/local/domain/0");
        assert_eq!(domain_path(DomId(65535)), "/local/domain/65535");
        assert_eq!(validate_path(&domain_path(DomId(3))), Ok(()));
    }

    #[test]
    fn path_validation() {
        for ok in ["/", "/a", "/local/domain/1/device/vif/0/state", "/a-b_c@d.e", "/..a", "/a..", "/.x"] {
            assert_eq!(validate_path(ok), Ok(()), "{ok:?}");
        }
        let long_ok = "/".to_string() + &"x".repeat(MAX_PATH_LEN - 1);
        assert_eq!(validate_path(&long_ok), Ok(()));
        let too_long = long_ok.clone() + "x";
        for bad in ["", "a", "a/b", "//", "/a/", "/a//b", "/a/../b", "/..", "/.", "/a/.", "/a b", "/a\tb", "/é", "/a\0"] {
            assert_eq!(validate_path(bad), Err(Errno::EINVAL), "{bad:?}");
        }
        assert_eq!(validate_path(&too_long), Err(Errno::EINVAL));
        assert_eq!(Request::GetDomainPath { domid: 1 }.path(), None);
        assert_eq!(Request::Mkdir { path: "/x".into() }.path(), Some("/x"));
    }

    fn path() -> impl Strategy<Value = String> {
        "(/[a-z0-9_-]{1,8}){0,6}".prop_map(|s| if s.is_empty() { "/".into() } else { s })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            path().prop_map(|path| Request::Read { path }),
            (path(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(path, value)| Request::Write { path, value }),
            path().prop_map(|path| Request::Mkdir { path }),
            path().prop_map(|path| Request::Remove { path }),
            path().prop_map(|path| Request::Directory { path }),
            (path(), "\\PC{0,10}").prop_map(|(path, token)| Request::Watch { path, token }),
            (path(), "\\PC{0,10}").prop_map(|(path, token)| Request::Unwatch { path, token }),
            (path(), any::<u16>(), proptest::collection::vec(any::<u16>(), 0..20))
                .prop_map(|(path, owner, readers)| Request::SetPerms { path, owner, readers }),
            any::<u16>().prop_map(|domid| Request::GetDomainPath { domid }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            Just(Response::Ok),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Response::Value),
            proptest::collection::vec("\\PC{0,12}", 0..20).prop_map(Response::List),
            path().prop_map(Response::Path),
            any::<i64>().prop_map(Response::Error),
            (path(), "\\PC{0,10}").prop_map(|(path, token)| Response::WatchEvent { path, token }),
        ]
    }

    /// Feeds `stream` to a decoder in pieces of the sizes in `cuts` (cycled).
    fn reassemble(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut d = FrameDecoder::new();
        let mut frames = Vec::new();
        let mut rest = stream;
        for c in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at((*c).min(rest.len()));
            frames.extend(d.push(piece).unwrap());
            rest = tail;
        }
        assert_eq!(d.buffered(), 0);
        frames
    }

    proptest! {
        #[test]
        fn generated_paths_are_valid(p in path()) {
            prop_assert_eq!(validate_path(&p), Ok(()));
        }

        #[test]
        fn validate_path_never_panics(p in "\\PC{0,300}") {
            let _ = validate_path(&p);
        }

        #[test]
        fn random_streams_in_random_pieces_round_trip(
            reqs in proptest::collection::vec((any::<u32>(), request()), 0..20),
            rsps in proptest::collection::vec((any::<u32>(), response()), 0..20),
            cuts in proptest::collection::vec(1usize..700, 1..50),
        ) {
            let reqs: Vec<RequestMsg> = reqs.into_iter().map(|(req_id, body)| Envelope { req_id, body }).collect();
            let rsps: Vec<ResponseMsg> = rsps.into_iter().map(|(req_id, body)| Envelope { req_id, body }).collect();
            let req_stream: Vec<u8> = reqs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
            let rsp_stream: Vec<u8> = rsps.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
            let got: Vec<RequestMsg> = reassemble(&req_stream, &cuts).iter().map(|f| decode_payload(f).unwrap()).collect();
            prop_assert_eq!(got, reqs);
            let got: Vec<ResponseMsg> = reassemble(&rsp_stream, &cuts).iter().map(|f| decode_payload(f).unwrap()).collect();
            prop_assert_eq!(got, rsps);
        }

        #[test]
        fn truncated_frames_never_decode_or_panic(m in request(), id in any::<u32>(), cut in any::<prop::sample::Index>()) {
            let f = encode_frame(&Envelope { req_id: id, body: m }).unwrap();
            let payload = &f[2..];
            let short = &payload[..cut.index(payload.len())];
            prop_assert_eq!(decode_payload::<RequestMsg>(short), Err(Errno::EINVAL));
            // A truncated stream leaves a partial frame buffered, no output.
            let mut d = FrameDecoder::new();
            prop_assert_eq!(d.push(&f[..f.len() - 1]), Ok(vec![]));
            prop_assert_eq!(d.buffered(), f.len() - 1);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode_payload::<RequestMsg>(&bytes);
            let _ = decode_payload::<ResponseMsg>(&bytes);
            let mut d = FrameDecoder::new();
            match d.push(&bytes) {
                Ok(frames) => {
                    for f in frames {
                        prop_assert!(f.len() <= MAX_PAYLOAD);
                        let _ = decode_payload::<RequestMsg>(&f);
                        let _ = decode_payload::<ResponseMsg>(&f);
                    }
                }
                Err(e) => prop_assert_eq!(e, Errno::E2BIG),
            }
            prop_assert!(d.buffered() <= MAX_FRAME);
        }
    }
}
