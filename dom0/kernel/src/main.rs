//! Dom0, the privileged domain. At this stage it reports its memory and
//! privileges, lists the domains with the privileged `domctl_list`
//! hypercall, and watches the DomUs until they have all ended.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("dom0 is a guest kernel: build and boot it with `cargo xtask qemu`.");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod guest {
    use dom0_core::{domain_line, state_name};
    use microhv_guest::hypercall as hc;
    use microhv_guest::shared_abi::hypercall::*;
    use microhv_guest::{entry, println, time, GuestVa, StartInfo};

    entry!(main);

    fn list(out: &mut [DomainInfo; 16]) -> usize {
        // SAFETY: `out` is valid for 16 records.
        match unsafe { hc::domctl_list(GuestVa(out.as_mut_ptr() as u64), 16) } {
            Ok(n) => (n as usize).min(16),
            Err(e) => {
                println!("domctl_list failed: {e}");
                0
            }
        }
    }

    fn main(si: &'static StartInfo) -> ! {
        let heap = microhv_guest::init_heap(si, 0);
        println!(
            "{} up: domid {}, {} pages ({} KiB), heap {} KiB, privileged: {}",
            si.name(), si.domid, si.nr_pages, si.nr_pages * 4, heap / 1024, if si.privileged() { "yes" } else { "no" }
        );
        let mut info = [DomainInfo::default(); 16];
        let n = list(&mut info);
        println!("privileged domctl_list succeeded: {n} domains");
        for d in &info[..n] {
            println!("  {}", domain_line(d).as_str());
        }
        // Watch the DomUs until every one of them has ended.
        let start = time::now_ns();
        loop {
            time::sleep_ns(20_000_000);
            let n = list(&mut info);
            let alive = info[..n].iter().filter(|d| d.domid != si.domid && d.state != DOMSTATE_DEAD).count();
            if alive == 0 || time::now_ns() - start > 30_000_000_000 {
                println!("all DomUs have ended:");
                for d in &info[..n] {
                    if d.domid != si.domid {
                        println!("  {} ({})", domain_line(d).as_str(), state_name(d.state));
                    }
                }
                break;
            }
        }
        microhv_guest::shutdown(SHUTDOWN_POWEROFF)
    }
}
