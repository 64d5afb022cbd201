//! dom0-core: the host-testable logic of the privileged domain (device
//! backends, toolstack). Foundation stage: nothing runs in Dom0 yet; microhv
//! only lists its image as a boot module.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

/// The name Dom0 prints before each of its console lines.
pub const NAME: &str = "dom0";
