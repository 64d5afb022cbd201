//! Store client: requests to Dom0's store over the store page (byte rings:
//! requests in `out`, responses and watch events in `in`), framed and encoded
//! as `shared_abi::store` defines.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use shared_abi::store::{decode_payload, encode_frame, Envelope, FrameDecoder, Request, Response};
use shared_abi::Errno;

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

struct State {
    decoder: FrameDecoder,
    /// Watch events that arrived while waiting for a response.
    events: Vec<(String, String)>,
}

static mut STATE: Option<State> = None;

fn state() -> &'static mut State {
    // SAFETY: a guest has one vCPU and the store is never used from the
    // upcall handler, so there is never more than one reference at a time.
    let s = unsafe { &mut *core::ptr::addr_of_mut!(STATE) };
    s.get_or_insert_with(|| State { decoder: FrameDecoder::new(), events: Vec::new() })
}

fn page() -> Result<crate::mm::SharedPage, Errno> {
    let si = crate::start_info();
    if si.store_va == 0 {
        return Err(Errno::ENOENT);
    }
    Ok(crate::mm::SharedPage(si.store_va as *mut u8))
}

fn notify() {
    // SAFETY: no pointers.
    let _ = unsafe { crate::hypercall::evtchn_send(crate::start_info().store_evtchn) };
}

/// Sends one request and waits for its response (at most `timeout_ms`).
pub fn request(req: Request) -> Result<Response, Errno> {
    let mut page = page()?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let frame = encode_frame(&Envelope { req_id: id, body: req })?;
    let mut rest = &frame[..];
    while !rest.is_empty() {
        let n = shared_abi::console::write_out(&mut page, rest);
        rest = &rest[n..];
        notify();
        if n == 0 {
            crate::time::sleep_ns(1_000_000);
        }
    }
    let deadline = crate::time::now_ns() + 5_000_000_000;
    let mut buf = [0u8; 512];
    loop {
        let n = shared_abi::console::read_in(&mut page, &mut buf).map_err(|_| Errno::EIO)?;
        if n > 0 {
            let st = state();
            for f in st.decoder.push(&buf[..n])? {
                let msg: Envelope<Response> = decode_payload(&f)?;
                match msg.body {
                    Response::WatchEvent { path, token } => st.events.push((path, token)),
                    body if msg.req_id == id => return Ok(body),
                    _ => {}
                }
            }
            continue;
        }
        if crate::time::now_ns() > deadline {
            return Err(Errno::EAGAIN);
        }
        // SAFETY: no pointers; wakes on the store port's event or after 2 ms.
        let _ = unsafe { crate::hypercall::sched_poll(crate::time::now_ns() + 2_000_000) };
    }
}

fn ok(r: Response) -> Result<Response, Errno> {
    match r {
        Response::Error(e) => Err(Errno(e)),
        other => Ok(other),
    }
}

pub fn read(path: &str) -> Result<Vec<u8>, Errno> {
    match ok(request(Request::Read { path: path.into() })?)? {
        Response::Value(v) => Ok(v),
        _ => Err(Errno::EIO),
    }
}

pub fn read_str(path: &str) -> Result<String, Errno> {
    String::from_utf8(read(path)?).map_err(|_| Errno::EINVAL)
}

pub fn read_u64(path: &str) -> Result<u64, Errno> {
    read_str(path)?.trim().parse().map_err(|_| Errno::EINVAL)
}

pub fn write(path: &str, value: &[u8]) -> Result<(), Errno> {
    ok(request(Request::Write { path: path.into(), value: value.into() })?).map(|_| ())
}

pub fn write_str(path: &str, value: &str) -> Result<(), Errno> {
    write(path, value.as_bytes())
}

pub fn directory(path: &str) -> Result<Vec<String>, Errno> {
    match ok(request(Request::Directory { path: path.into() })?)? {
        Response::List(v) => Ok(v),
        _ => Err(Errno::EIO),
    }
}

/// This domain's home in the store, e.g. `/local/domain/3`.
pub fn home() -> String {
    shared_abi::store::domain_path(shared_abi::DomId(crate::start_info().domid))
}

/// Polls `path` until `pred` accepts its value, or `timeout_ns` passes.
pub fn wait_for(path: &str, timeout_ns: u64, pred: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>, Errno> {
    let end = crate::time::now_ns() + timeout_ns;
    loop {
        match read(path) {
            Ok(v) if pred(&v) => return Ok(v),
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        if crate::time::now_ns() > end {
            return Err(Errno::EAGAIN);
        }
        crate::time::sleep_ns(2_000_000);
    }
}
