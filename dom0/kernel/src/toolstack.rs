//! Dom0's toolstack: creates DomUs from the configuration files and images
//! that microhv handed over as boot modules, like `xl create`.
//!
//! For each `*.toml` module: parse and validate it (dom0-core), create an
//! empty domain (`domctl_create`), build its memory image with the same
//! builder microhv uses (microhv-core), writing the new domain's frames
//! through temporary `domctl_map` mappings, unmap them all, and start it
//! (`domctl_start`, where microhv validates the page tables Dom0 built). Any
//! failure destroys the half-built domain and names the file and the problem.

extern crate alloc;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use dom0_core::config::{self, LaunchKind};
use microhv_core::builder::{self, DomainConfig};
use microhv_core::machine::MachineMemory;
use microhv_guest::hypercall as hc;
use microhv_guest::mm::{self, PTE_NX, PTE_PRESENT};
use microhv_guest::shared_abi::hypercall::*;
use microhv_guest::{println, DomId, Errno, GuestVa, Mfn};

/// Set during stress runs: no line per created domain.
pub static QUIET: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// A boot module mapped (read-only) into Dom0.
pub struct Module {
    /// The whole module line (file name and arguments).
    pub name: String,
    pub file: String,
    pub bytes: &'static [u8],
    /// Its index in microhv's module list (for `domctl_create_hvm`).
    pub index: u64,
}

/// Pages needed to map every module Dom0 was given (0 without a toolstack).
pub fn module_pages() -> u64 {
    let mut infos = [ModuleInfo::default(); 16];
    // SAFETY: `infos` is valid for 16 records.
    let n = unsafe { hc::domctl_modules(GuestVa(infos.as_mut_ptr() as u64), 16) }
        .unwrap_or(0)
        .min(16) as usize;
    infos[..n].iter().map(|m| m.size.div_ceil(4096)).sum()
}

/// Maps every module Dom0 was given into the `slots` (consumed from the
/// front). Returns them in order.
pub fn map_modules(slots: &mut Vec<u64>) -> Vec<Module> {
    let mut infos = [ModuleInfo::default(); 16];
    // SAFETY: `infos` is valid for 16 records.
    let n = match unsafe { hc::domctl_modules(GuestVa(infos.as_mut_ptr() as u64), 16) } {
        Ok(n) => (n as usize).min(16),
        Err(e) => {
            println!("toolstack: domctl_modules failed: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (index, m) in infos[..n].iter().enumerate() {
        let index = index as u64;
        let end = m.name.iter().position(|&b| b == 0).unwrap_or(m.name.len());
        let name = String::from_utf8_lossy(&m.name[..end]).into_owned();
        // GRUB passes the module's path ("/boot/domu.elf ..."): keep the file name.
        let file = name.split_ascii_whitespace().next().unwrap_or("").rsplit('/').next().unwrap_or("").into();
        let pages = m.size.div_ceil(4096) as usize;
        if pages > slots.len() {
            println!(
                "toolstack: no room to map module {name} ({} KiB)",
                m.size / 1024
            );
            continue;
        }
        let vas: Vec<u64> = slots.drain(..pages).collect();
        // Module frames are ours now: map them read-only, in order.
        let reqs: Vec<MmuUpdate> = vas
            .iter()
            .enumerate()
            .filter_map(|(i, &va)| {
                let ptr = mm::l1_entry_maddr(va)?;
                Some(MmuUpdate {
                    ptr,
                    val: ((m.start_mfn + i as u64) << 12) | PTE_PRESENT | PTE_NX,
                })
            })
            .collect();
        if reqs.len() != pages {
            println!(
                "toolstack: could not map module {name}: {} of {pages} slots usable",
                reqs.len()
            );
            continue;
        }
        if let Some((done, e)) = reqs
            .chunks(BATCH_MAX as usize)
            .enumerate()
            .find_map(|(i, c)| {
                mm::mmu_update(c)
                    .err()
                    .map(|(d, e)| (i * BATCH_MAX as usize + d, e))
            })
        {
            println!("toolstack: could not map module {name}: page {done}: {e}");
            continue;
        }
        mm::invlpg(u64::MAX);
        // SAFETY: `pages` consecutive slots now map the module read-only.
        let bytes = unsafe { core::slice::from_raw_parts(vas[0] as *const u8, m.size as usize) };
        out.push(Module { name, file, bytes, index });
    }
    out
}

/// The new domain's memory, reached through a few temporary mappings.
struct ForeignMemory {
    domid: DomId,
    slots: Vec<u64>,
    /// (mfn, va) in use, most recent last.
    mapped: RefCell<Vec<(u64, u64)>>,
    failed: RefCell<Option<Errno>>,
}

impl ForeignMemory {
    fn va(&self, mfn: Mfn) -> u64 {
        let mut m = self.mapped.borrow_mut();
        if let Some(i) = m.iter().position(|&(f, _)| f == mfn.0) {
            let e = m.remove(i);
            m.push(e);
            return e.1;
        }
        let va = if m.len() < self.slots.len() {
            self.slots[m.len()]
        } else {
            let (old, va) = m.remove(0);
            // SAFETY: our own slot, mapping a frame of the domain being built.
            let _ = unsafe { hc::domctl_unmap(self.domid, Mfn(old), GuestVa(va)) };
            va
        };
        // SAFETY: `va` is an empty slot of ours.
        if let Err(e) = unsafe { hc::domctl_map(self.domid, mfn, GuestVa(va)) } {
            *self.failed.borrow_mut() = Some(e);
        }
        m.push((mfn.0, va));
        va
    }

    fn unmap_all(&self) {
        for (mfn, va) in self.mapped.borrow_mut().drain(..) {
            // SAFETY: undoing our own mapping.
            let _ = unsafe { hc::domctl_unmap(self.domid, Mfn(mfn), GuestVa(va)) };
        }
    }
}

impl MachineMemory for ForeignMemory {
    fn read_u64(&self, mfn: Mfn, index: usize) -> u64 {
        // SAFETY: `va` maps the frame (or a failure was recorded and the
        // slot's previous page is read harmlessly); index < 512.
        // SAFETY: as above.
        unsafe { ((self.va(mfn) + index as u64 * 8) as *const u64).read_volatile() }
    }
    fn write_u64(&mut self, mfn: Mfn, index: usize, val: u64) {
        // SAFETY: as above, mapped writable.
        unsafe { ((self.va(mfn) + index as u64 * 8) as *mut u64).write_volatile(val) }
    }
    fn read_bytes(&self, mfn: Mfn, offset: usize, buf: &mut [u8]) {
        let va = self.va(mfn);
        // SAFETY: offset + len <= 4096 by the trait's contract.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (va + offset as u64) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }
    fn write_bytes(&mut self, mfn: Mfn, offset: usize, data: &[u8]) {
        let va = self.va(mfn);
        // SAFETY: as above.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (va + offset as u64) as *mut u8,
                data.len(),
            )
        }
    }
}

/// An HVM guest: microhv loads the multiboot kernel itself (it has no PV
/// page tables for Dom0 to build); Dom0 names the module and the sizes.
fn create_hvm(cfg_module: &Module, cfg: &config::DomainConfig, image: &Module) -> Result<DomId, String> {
    let mut spec = DomainCreate { nr_pages: cfg.memory_pages, max_pages: cfg.max_pages, weight: cfg.weight, ..Default::default() };
    let n = cfg.name.len().min(31);
    spec.name[..n].copy_from_slice(&cfg.name.as_bytes()[..n]);
    let cmd = cfg.cmdline.as_bytes();
    // SAFETY: the pointer arguments are live locals of this function.
    let r = unsafe {
        hc::domctl_create_hvm(GuestVa(&spec as *const _ as u64), image.index, GuestVa(cmd.as_ptr() as u64), cmd.len() as u64)
    };
    let domid = match r {
        Ok(id) => DomId(id as u16),
        Err(e) if e == Errno::ENOSYS => {
            return Err(format!("{}: {} is not a PV image, and microhv cannot run HVM guests here (no VT-x): {e}", cfg_module.file, cfg.kernel))
        }
        Err(e) => return Err(format!("{}: create HVM domain from {}: {e}", cfg_module.file, cfg.kernel)),
    };
    if !QUIET.load(core::sync::atomic::Ordering::Relaxed) {
        println!(
            "toolstack: created {} (domain {}) from {}: HVM, {} pages, kernel {}",
            cfg.name, domid.0, cfg_module.file, cfg.memory_pages, cfg.kernel
        );
    }
    Ok(domid)
}

/// Creates and starts the domain that `cfg_module` describes. On any error
/// nothing is left behind, and the message names the file.
/// Creates `count` domains from one configuration, named `<name>1`,
/// `<name>2`, ... (the `name` line is rewritten). Returns how many started.
pub fn spawn(m: &Module, modules: &[Module], scratch: &[u64], count: u32) -> u32 {
    let Ok(text) = core::str::from_utf8(m.bytes) else { return 0 };
    let Ok(cfg) = config::parse(&m.file, text) else { return 0 };
    QUIET.store(true, core::sync::atomic::Ordering::Relaxed);
    let mut made = 0;
    for i in 1..=count {
        let renamed: String = text
            .lines()
            .map(|l| if l.trim_start().starts_with("name") { format!("name = \"{}{i}\"\n", cfg.name) } else { format!("{l}\n") })
            .collect();
        // The module must live as long as the domain may be re-created.
        let bytes: &'static [u8] = alloc::boxed::Box::leak(renamed.into_bytes().into_boxed_slice());
        let copy = Module { name: m.name.clone(), file: m.file.clone(), bytes, index: m.index };
        match create(&copy, modules, scratch) {
            Ok(_) => made += 1,
            Err(e) => {
                println!("spawn: {e}");
                break;
            }
        }
    }
    QUIET.store(false, core::sync::atomic::Ordering::Relaxed);
    made
}

/// The configuration (among the `.toml` modules) that describes `name`.
fn config_of(name: &str, modules: &[Module]) -> Option<config::DomainConfig> {
    modules
        .iter()
        .filter(|m| m.file.ends_with(".toml"))
        .filter_map(|m| config::parse(&m.file, core::str::from_utf8(m.bytes).ok()?).ok())
        .find(|c| c.name == name)
}

/// The virtual disks the configuration module that creates `name` lists.
pub fn disks_of(name: &str, modules: &[Module]) -> Vec<config::Disk> {
    config_of(name, modules).map(|c| c.disks).unwrap_or_default()
}

/// The `peer` the configuration of `name` names, if any.
pub fn peer_of(name: &str, modules: &[Module]) -> Option<String> {
    config_of(name, modules).and_then(|c| c.peer)
}

pub fn create(cfg_module: &Module, modules: &[Module], scratch: &[u64]) -> Result<DomId, String> {
    let text = core::str::from_utf8(cfg_module.bytes)
        .map_err(|_| format!("{}: not UTF-8 text", cfg_module.file))?;
    let cfg = config::parse(&cfg_module.file, text).map_err(|e| format!("{e}"))?;
    let image = modules
        .iter()
        .find(|m| m.file == cfg.kernel)
        .ok_or_else(|| {
            format!(
                "{}: kernel: no module named '{}'",
                cfg_module.file, cfg.kernel
            )
        })?;
    match config::validate(&cfg, &cfg_module.file, image.bytes).map_err(|e| format!("{e}"))? {
        LaunchKind::Pv => {}
        LaunchKind::Hvm => return create_hvm(cfg_module, &cfg, image),
    }
    let img = builder::parse_pv_image(image.bytes).map_err(|e| format!("{}: {}", cfg.kernel, e))?;
    // Names identify domains in the shell: one live domain per name.
    let mut infos = alloc::vec![DomainInfo::default(); 1024];
    // SAFETY: `infos` is valid for 1024 records.
    let n = unsafe { hc::domctl_list(GuestVa(infos.as_mut_ptr() as u64), 1024) }
        .unwrap_or(0)
        .min(1024) as usize;
    if infos[..n].iter().any(|d| {
        d.state != DOMSTATE_DEAD && d.name.split(|&b| b == 0).next() == Some(cfg.name.as_bytes())
    }) {
        return Err(format!(
            "{}: a domain named '{}' already exists",
            cfg_module.file, cfg.name
        ));
    }
    let mut spec = DomainCreate {
        nr_pages: cfg.memory_pages,
        max_pages: cfg.max_pages,
        weight: cfg.weight,
        ..Default::default()
    };
    let n = cfg.name.len().min(31);
    spec.name[..n].copy_from_slice(&cfg.name.as_bytes()[..n]);
    // SAFETY: (hypercalls below) pointers to live locals.
    let domid = DomId(
        // SAFETY: the pointer arguments are live locals of this function or pages we own.
        unsafe { hc::domctl_create(GuestVa(&spec as *const _ as u64)) }
            .map_err(|e| format!("{}: create: {e}", cfg_module.file))? as u16,
    );
    let destroy = |why: String| -> Result<DomId, String> {
        // SAFETY: no pointer arguments.
        let _ = unsafe { hc::domctl_destroy(domid) };
        Err(why)
    };
    let mut frames = alloc::vec![0u64; cfg.memory_pages as usize];
    // SAFETY: no pointer arguments.
    if let Err(e) = unsafe {
        hc::domctl_get_frames(domid, GuestVa(frames.as_mut_ptr() as u64), cfg.memory_pages)
    } {
        return destroy(format!("{}: get_frames: {e}", cfg_module.file));
    }
    let frames: Vec<Mfn> = frames.into_iter().map(Mfn).collect();
    let mut mem = ForeignMemory {
        domid,
        slots: scratch.to_vec(),
        mapped: RefCell::new(Vec::new()),
        failed: RefCell::new(None),
    };
    let bcfg = DomainConfig {
        domid,
        name: &cfg.name,
        cmdline: &cfg.cmdline,
        privileged: false,
        max_pages: cfg.max_pages,
    };
    let built = builder::build(&mut mem, &img, image.bytes, &frames, &bcfg);
    mem.unmap_all();
    if let Some(e) = *mem.failed.borrow() {
        return destroy(format!(
            "{}: mapping the new domain's memory: {e}",
            cfg_module.file
        ));
    }
    let built = match built {
        Ok(b) => b,
        Err(e) => return destroy(format!("{}: {}", cfg.kernel, e)),
    };
    let start = DomainStart {
        entry: built.entry,
        stack_top: built.stack_top,
        start_info_va: built.start_info_va,
        l4_mfn: built.l4.0,
        shared_info_pfn: built.layout.shared_info_pfn,
        start_info_pfn: built.layout.start_info_pfn,
        first_free_pfn: built.first_free_pfn,
        virt_base: built.virt_base,
    };
    // SAFETY: the pointer arguments are live locals of this function or pages we own.
    if let Err(e) = unsafe { hc::domctl_start(domid, GuestVa(&start as *const _ as u64)) } {
        return destroy(format!("{}: start: {e}", cfg_module.file));
    }
    if !QUIET.load(core::sync::atomic::Ordering::Relaxed) {
        println!(
            "toolstack: created {} (domain {}) from {}: {} pages, kernel {}",
            cfg.name, domid.0, cfg_module.file, cfg.memory_pages, cfg.kernel
        );
    }
    Ok(domid)
}
