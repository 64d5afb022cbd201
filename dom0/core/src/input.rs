//! Routing of serial input typed on Dom0's UART: to Dom0's own command line,
//! or, after a switch, to one DomU's console. `Ctrl-]` (0x1d) moves the input
//! to the next target (Dom0, then each DomU in turn, then Dom0 again).

use alloc::string::String;
use alloc::vec::Vec;

/// The key that switches the input target.
pub const SWITCH_KEY: u8 = 0x1d;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A complete line typed for Dom0.
    Dom0Line(String),
    /// Bytes for DomU `id`'s console input ring.
    ToDomU(u16, Vec<u8>),
    /// Input now goes to this target (`None` = Dom0).
    Switched(Option<(u16, String)>),
}

#[derive(Default)]
pub struct InputRouter {
    domus: Vec<(u16, String)>,
    /// 0 = Dom0, i = domus[i - 1].
    current: usize,
    line: Vec<u8>,
}

impl InputRouter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_domu(&mut self, id: u16, name: &str) {
        self.domus.push((id, name.into()));
    }

    /// Forgets a DomU that ended; input for it goes back to Dom0.
    pub fn remove_domu(&mut self, id: u16) -> Option<Action> {
        let i = self.domus.iter().position(|(d, _)| *d == id)?;
        self.domus.remove(i);
        if self.current == i + 1 {
            self.current = 0;
            return Some(Action::Switched(None));
        }
        if self.current > i + 1 {
            self.current -= 1;
        }
        None
    }

    /// Sends the input to DomU `id` (or to Dom0 with `None`) directly.
    pub fn switch_to(&mut self, id: Option<u16>) -> Option<Action> {
        let current = match id {
            None => 0,
            Some(id) => self.domus.iter().position(|(d, _)| *d == id)? + 1,
        };
        self.current = current;
        self.line.clear();
        Some(Action::Switched(self.target().cloned()))
    }

    pub fn target(&self) -> Option<&(u16, String)> {
        self.current.checked_sub(1).and_then(|i| self.domus.get(i))
    }

    /// Feeds typed bytes; returns what to do, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Action> {
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for &b in bytes {
            if b == SWITCH_KEY {
                if let Some((id, _)) = self.target() {
                    if !pending.is_empty() {
                        out.push(Action::ToDomU(*id, core::mem::take(&mut pending)));
                    }
                }
                self.current = (self.current + 1) % (self.domus.len() + 1);
                self.line.clear();
                out.push(Action::Switched(self.target().cloned()));
                continue;
            }
            match self.target() {
                Some(_) => pending.push(if b == b'\r' { b'\n' } else { b }),
                // Not collapsed into a match guard: an empty line's CR/LF
                // must stop here, not fall through to the other arms.
                #[allow(clippy::collapsible_match)]
                None => match b {
                    b'\r' | b'\n' => {
                        if !self.line.is_empty() {
                            let l = String::from_utf8_lossy(&self.line).into_owned();
                            self.line.clear();
                            out.push(Action::Dom0Line(l));
                        }
                    }
                    0x08 | 0x7f => {
                        self.line.pop();
                    }
                    b if b >= 0x20 && self.line.len() < 200 => self.line.push(b),
                    _ => {}
                },
            }
        }
        if let Some((id, _)) = self.target() {
            if !pending.is_empty() {
                out.push(Action::ToDomU(*id, pending));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_go_to_dom0_until_switched() {
        let mut r = InputRouter::new();
        r.add_domu(1, "domu1");
        r.add_domu(2, "domu2");
        assert_eq!(r.feed(b"hel"), vec![]);
        assert_eq!(r.feed(b"lo\r"), vec![Action::Dom0Line("hello".into())]);
        let a = r.feed(b"\x1dping\r");
        assert_eq!(a, vec![Action::Switched(Some((1, "domu1".into()))), Action::ToDomU(1, b"ping\n".to_vec())]);
        let a = r.feed(b"\x1d\x1dls\n");
        assert_eq!(a[0], Action::Switched(Some((2, "domu2".into()))));
        assert_eq!(a[1], Action::Switched(None));
        assert_eq!(a[2], Action::Dom0Line("ls".into()));
    }

    #[test]
    fn switch_to_a_named_domu() {
        let mut r = InputRouter::new();
        r.add_domu(4, "web");
        assert_eq!(r.switch_to(Some(9)), None);
        assert_eq!(r.switch_to(Some(4)), Some(Action::Switched(Some((4, "web".into())))));
        assert_eq!(r.feed(b"x"), vec![Action::ToDomU(4, b"x".to_vec())]);
        assert_eq!(r.switch_to(None), Some(Action::Switched(None)));
    }

    #[test]
    fn editing_and_control_bytes() {
        let mut r = InputRouter::new();
        assert_eq!(r.feed(b"lisx\x7ft\x01\r\r"), vec![Action::Dom0Line("list".into())]);
        // With no DomUs, the switch key stays on Dom0.
        assert_eq!(r.feed(b"\x1d"), vec![Action::Switched(None)]);
    }

    #[test]
    fn removing_the_target_returns_input_to_dom0() {
        let mut r = InputRouter::new();
        r.add_domu(1, "a");
        r.add_domu(2, "b");
        r.feed(b"\x1d\x1d");
        assert_eq!(r.target().map(|t| t.0), Some(2));
        assert_eq!(r.remove_domu(1), None);
        assert_eq!(r.target().map(|t| t.0), Some(2));
        assert_eq!(r.remove_domu(2), Some(Action::Switched(None)));
        assert_eq!(r.target(), None);
    }
}
