//! The frontend/backend device handshake (like Xen's `XenbusState`): the
//! states each end publishes in its store `state` node, and the one table of
//! transitions either end may make.
//!
//! Store values are the decimal state number as text (`"4"` = Connected).
//!
//! # Transitions
//!
//! | from | to | who | meaning |
//! | --- | --- | --- | --- |
//! | Unknown | Initialising | both | the driver starts on a new device node |
//! | Initialising | InitWait | back | back end published its details, waits for the front |
//! | Initialising | Initialised | front | front end published its ring and event channel |
//! | InitWait | Connected | back | back end mapped the front's ring |
//! | Initialised | Connected | front | front end saw the back end connect |
//! | Initialising, InitWait, Initialised, Connected | Closing | both | shutdown or failure: begin tearing down |
//! | Closing | Closed | both | resources released |
//! | Closed | Initialising | both | reconnect |
//! | Closed | Unknown | both | the device node is removed |
//!
//! Writing the state an end is already in is a no-op and always allowed.
//! Everything else is `EINVAL`.

use crate::Errno;
use core::fmt;
use core::str::FromStr;

/// A device end's state, as stored in its `state` node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// No state yet (or the node is missing).
    Unknown,
    /// The end is setting itself up.
    Initialising,
    /// Back end: ready, waiting for the front end's details.
    InitWait,
    /// Front end: its details are published.
    Initialised,
    /// The ring is live.
    Connected,
    /// Tearing down.
    Closing,
    /// Torn down.
    Closed,
}

impl DeviceState {
    /// Every state, in number order.
    pub const ALL: [DeviceState; 7] = [
        DeviceState::Unknown,
        DeviceState::Initialising,
        DeviceState::InitWait,
        DeviceState::Initialised,
        DeviceState::Connected,
        DeviceState::Closing,
        DeviceState::Closed,
    ];

    /// The state's number (0..=6, Xen's numbering).
    pub const fn as_u8(self) -> u8 {
        match self {
            DeviceState::Unknown => 0,
            DeviceState::Initialising => 1,
            DeviceState::InitWait => 2,
            DeviceState::Initialised => 3,
            DeviceState::Connected => 4,
            DeviceState::Closing => 5,
            DeviceState::Closed => 6,
        }
    }

    /// The store value: the number in decimal (`"4"`).
    pub const fn to_str(self) -> &'static str {
        match self {
            DeviceState::Unknown => "0",
            DeviceState::Initialising => "1",
            DeviceState::InitWait => "2",
            DeviceState::Initialised => "3",
            DeviceState::Connected => "4",
            DeviceState::Closing => "5",
            DeviceState::Closed => "6",
        }
    }

    /// Parses a store value given as bytes (exactly one digit `0`..=`6`).
    pub fn from_value(v: &[u8]) -> Result<DeviceState, Errno> {
        match v {
            [d @ b'0'..=b'9'] => DeviceState::try_from(d - b'0'),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The state's name, for logs (`"Connected"`).
    pub const fn name(self) -> &'static str {
        match self {
            DeviceState::Unknown => "Unknown",
            DeviceState::Initialising => "Initialising",
            DeviceState::InitWait => "InitWait",
            DeviceState::Initialised => "Initialised",
            DeviceState::Connected => "Connected",
            DeviceState::Closing => "Closing",
            DeviceState::Closed => "Closed",
        }
    }
}

impl TryFrom<u8> for DeviceState {
    type Error = Errno;
    fn try_from(v: u8) -> Result<Self, Errno> {
        DeviceState::ALL.get(v as usize).copied().ok_or(Errno::EINVAL)
    }
}

impl From<DeviceState> for u8 {
    fn from(s: DeviceState) -> u8 {
        s.as_u8()
    }
}

impl FromStr for DeviceState {
    type Err = Errno;
    /// Parses a store value (exactly one digit `0`..=`6`).
    fn from_str(s: &str) -> Result<Self, Errno> {
        DeviceState::from_value(s.as_bytes())
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which end of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Frontend,
    Backend,
}

/// Who may make a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Front,
    Back,
    Both,
}

impl Who {
    /// Whether `role` is included.
    pub const fn allows(self, role: Role) -> bool {
        matches!((self, role), (Who::Both, _) | (Who::Front, Role::Frontend) | (Who::Back, Role::Backend))
    }
}

/// The legal transitions (besides staying in the same state).
pub const TRANSITIONS: &[(DeviceState, DeviceState, Who)] = {
    use DeviceState::*;
    &[
        (Unknown, Initialising, Who::Both),
        (Initialising, InitWait, Who::Back),
        (Initialising, Initialised, Who::Front),
        (InitWait, Connected, Who::Back),
        (Initialised, Connected, Who::Front),
        (Initialising, Closing, Who::Both),
        (InitWait, Closing, Who::Both),
        (Initialised, Closing, Who::Both),
        (Connected, Closing, Who::Both),
        (Closing, Closed, Who::Both),
        (Closed, Initialising, Who::Both),
        (Closed, Unknown, Who::Both),
    ]
};

fn lookup(from: DeviceState, to: DeviceState) -> Option<Who> {
    TRANSITIONS.iter().find(|(f, t, _)| *f == from && *t == to).map(|(_, _, w)| *w)
}

/// Whether some end may move from `from` to `to`: `Ok` for a listed
/// transition or `from == to`, `EINVAL` otherwise.
pub fn check_transition(from: DeviceState, to: DeviceState) -> Result<(), Errno> {
    if from == to || lookup(from, to).is_some() {
        Ok(())
    } else {
        Err(Errno::EINVAL)
    }
}

/// Whether an end of kind `role` may move from `from` to `to`.
pub fn check_transition_for(role: Role, from: DeviceState, to: DeviceState) -> Result<(), Errno> {
    if from == to || lookup(from, to).is_some_and(|w| w.allows(role)) {
        Ok(())
    } else {
        Err(Errno::EINVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceState::*;

    #[test]
    fn numbers_and_strings_round_trip() {
        for (i, s) in DeviceState::ALL.iter().enumerate() {
            assert_eq!(s.as_u8() as usize, i);
            assert_eq!(DeviceState::try_from(i as u8), Ok(*s));
            assert_eq!(s.to_str().parse::<DeviceState>(), Ok(*s));
            assert_eq!(DeviceState::from_value(s.to_str().as_bytes()), Ok(*s));
            assert_eq!(u8::from(*s), i as u8);
        }
        assert_eq!(Connected.to_str(), "4");
        assert_eq!(Connected.name(), "Connected");
        assert_eq!(DeviceState::try_from(7), Err(Errno::EINVAL));
        for bad in ["", "7", "9", "04", "4 ", " 4", "-1", "x", "44"] {
            assert_eq!(bad.parse::<DeviceState>(), Err(Errno::EINVAL), "{bad:?}");
        }
    }

    #[test]
    fn normal_handshake_is_legal() {
        let back = [Unknown, Initialising, InitWait, Connected, Closing, Closed, Initialising];
        let front = [Unknown, Initialising, Initialised, Connected, Closing, Closed, Unknown];
        for w in back.windows(2) {
            assert_eq!(check_transition_for(Role::Backend, w[0], w[1]), Ok(()), "{} -> {}", w[0], w[1]);
        }
        for w in front.windows(2) {
            assert_eq!(check_transition_for(Role::Frontend, w[0], w[1]), Ok(()), "{} -> {}", w[0], w[1]);
        }
    }

    #[test]
    fn illegal_transitions_are_einval() {
        for (from, to) in [
            (Unknown, Connected),
            (Initialising, Connected),
            (InitWait, Initialised),
            (Connected, Initialising),
            (Connected, Closed),
            (Closing, Connected),
            (Closed, Connected),
            (Unknown, Closing),
            (Closing, Initialising),
        ] {
            assert_eq!(check_transition(from, to), Err(Errno::EINVAL), "{from} -> {to}");
        }
        // Role-specific steps.
        assert_eq!(check_transition_for(Role::Frontend, Initialising, InitWait), Err(Errno::EINVAL));
        assert_eq!(check_transition_for(Role::Backend, Initialising, Initialised), Err(Errno::EINVAL));
        assert_eq!(check_transition_for(Role::Frontend, InitWait, Connected), Err(Errno::EINVAL));
        assert_eq!(check_transition_for(Role::Backend, Initialised, Connected), Err(Errno::EINVAL));
    }

    #[test]
    fn table_is_consistent() {
        for (i, a) in TRANSITIONS.iter().enumerate() {
            assert_ne!(a.0, a.1);
            for b in &TRANSITIONS[i + 1..] {
                assert!(!(a.0 == b.0 && a.1 == b.1), "duplicate {} -> {}", a.0, a.1);
            }
        }
        // Exactly the table (plus self-loops) passes.
        let mut legal = 0;
        for from in DeviceState::ALL {
            for to in DeviceState::ALL {
                if from != to && check_transition(from, to).is_ok() {
                    legal += 1;
                }
                assert_eq!(check_transition(from, from), Ok(()));
            }
        }
        assert_eq!(legal, TRANSITIONS.len());
        // Every state but Closing can reach Closing or is past it.
        for s in [Initialising, InitWait, Initialised, Connected] {
            assert_eq!(check_transition(s, Closing), Ok(()));
        }
    }
}
