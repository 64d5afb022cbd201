//! domu-core: the host-testable logic of the demo PV guest (frontends, demo
//! work). Foundation stage: nothing runs in DomUs yet; microhv only lists
//! their images as boot modules.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
