//! System tests for the block path: Dom0 drives virtio-blk, each DomU gets a
//! region of the disk image through the PV block split driver. The tests
//! look at the image file itself, from the host, after each boot.

use microhv_tests::disk::{assert_demo_region, assert_zero_outside, demo_end, DOMU1_START, DOMU2_START, SECTOR};
use microhv_tests::{assert_contains, assert_frames_returned};
use std::path::PathBuf;
use xtask::{ensure_disk, test_run, Outcome};

/// The hostile guest's virtual disk (its test configuration below).
const HOSTILE_START: usize = 65536;

/// A fresh disk image of the test's own (tests run in parallel).
fn fresh_disk(name: &str) -> PathBuf {
    let dir = xtask::project_root().join("target").join("test-disks");
    std::fs::create_dir_all(&dir).expect("test disk directory");
    let path = dir.join(format!("{name}.img"));
    ensure_disk(&path, true).expect("qemu-img");
    path
}

#[test]
fn a_second_boot_reads_what_the_first_wrote() {
    let disk = fresh_disk("two-boots");
    for run in 1..=2u64 {
        let mut r = test_run();
        r.disk = Some(disk.clone());
        let res = r.run().expect("QEMU");
        let out = &res.serial;
        assert_eq!(res.outcome, Outcome::Success, "boot {run}:\n{out}");
        assert_contains(out, &[
            "[dom0] pci 00:",
            "virtio Block",
            "[dom0] block: virtio-blk at",
            "131072 sectors (64 MiB), interrupt line",
            "[dom0] block: domu1: virtual disk xvda = sectors 2048..18432 of the real disk",
            "[dom0] block: domu2: virtual disk xvda = sectors 32768..49152 of the real disk",
            "[dom0] block: domu1/xvda: connected",
            "[domu1] disk: read past the end of the disk -> EIO (as expected)",
            "[domu2] disk: read past the end of the disk -> EIO (as expected)",
            &format!("[domu1] disk: run {run}: wrote 1024 KiB in "),
            &format!("[domu2] disk: run {run}: wrote 1024 KiB in "),
            "32 requests of 32 KiB, 4 in flight",
            "[dom0] block: domu1/xvda: disconnected (frontend closed)",
            "microhv: summary: 3 domains ran: dom0 poweroff, domu1 poweroff, domu2 poweroff; exit success",
        ]);
        if run == 1 {
            assert_contains(out, &["[domu1] disk: 16384 sectors; no earlier run of domu1 on it (a fresh disk)"]);
        } else {
            assert_contains(out, &[
                "[domu1] disk: 16384 sectors; found run 1 written by domu1: read back 1024 KiB, all 131072 words match",
                "[domu2] disk: 16384 sectors; found run 1 written by domu2: read back 1024 KiB, all 131072 words match",
            ]);
        }
        assert!(!out.contains("FAILED") && !out.contains("DIFFER"), "{out}");
        assert_frames_returned(out);
        // From the host: each DomU's bytes at its own offset, nothing elsewhere.
        let img = std::fs::read(&disk).expect("disk image");
        assert_demo_region(&img, DOMU1_START, "domu1", run);
        assert_demo_region(&img, DOMU2_START, "domu2", run);
        assert_zero_outside(&img, &[(DOMU1_START, demo_end(DOMU1_START)), (DOMU2_START, demo_end(DOMU2_START))]);
    }
}

#[test]
fn a_hostile_block_frontend_gets_errors_and_dom0_keeps_serving_the_other_domu() {
    let disk = fresh_disk("hostile");
    let images = xtask::images_for_tests();
    std::fs::write(
        images.dir.join("h-blk.toml"),
        format!("name = \"h-blk\"\nkernel = \"hostile.elf\"\nmemory = \"2M\"\ncmdline = \"attack=blk\"\nkind = \"pv\"\ndisks = [\"xvda:{HOSTILE_START}:2048\"]\n"),
    )
    .expect("fixture");
    let mut r = test_run();
    r.modules = vec![
        "dom0.elf name=dom0 toolstack mem=32M".into(),
        "domu.elf".into(),
        "hostile.elf".into(),
        "domu1.toml".into(),
        "h-blk.toml".into(),
    ];
    r.disk = Some(disk.clone());
    let res = r.run().expect("QEMU");
    let out = &res.serial;
    assert_eq!(res.outcome, Outcome::Success, "{out}");
    assert_contains(out, &[
        "[h-blk] check blk: a valid write of our page to our sector 0: got Ok(0), want success -> ok",
        "[h-blk] check blk: write with forged grant 30583: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: read into forged grant 4294967295: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: read far outside: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: segment with last sector 9: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: grant another domain's frame to dom0: got Err(EPERM(-1)), want EPERM -> ok",
        "[h-blk] check blk: write at the sector past the end: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: write straddling the end: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: write at sector 2^64-1 (wraps): got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: write of 9 segments: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: write of 255 segments: got status Ok(-1), want -1 -> ok",
        "[h-blk] check blk: unknown operation 99: got status Ok(-2), want -2 -> ok",
        "[h-blk] check blk: 64 garbage requests answered (64), none succeeded (0)",
        "[dom0] block: h-blk/xvda: disconnected (ring indexes impossible (a hostile or broken frontend))",
        "[domu1] disk: run 1: wrote 1024 KiB in ",
        "[domu1] disk: disconnected",
    ]);
    assert!(!out.contains("-> FAIL"), "{out}");
    assert!(out.contains("[h-blk] ATTACK blk: all ") && out.contains(" checks ok"), "{out}");
    assert_frames_returned(out);
    let img = std::fs::read(&disk).expect("disk image");
    assert_demo_region(&img, DOMU1_START, "domu1", 1);
    // The attacker's one valid write, and nothing else anywhere.
    let h = HOSTILE_START * SECTOR;
    assert!(img[h..h + 4096].iter().all(|&b| b == 0x4b), "the attacker's own valid write");
    assert_zero_outside(&img, &[(DOMU1_START, demo_end(DOMU1_START)), (HOSTILE_START, HOSTILE_START + 8)]);
}
