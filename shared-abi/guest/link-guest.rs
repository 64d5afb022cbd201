// The build script of every PV guest kernel (dom0, domu-kernel, the hostile
// test guest): link with microhv-guest's linker script. Host builds (for
// `cargo check --workspace`) get no linker arguments.
fn main() {
    let script = std::env::var("DEP_MICROHV_GUEST_LINKER_SCRIPT")
        .expect("a guest kernel must depend on microhv-guest, which exports its linker script");
    println!("cargo:rerun-if-changed={script}");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{script}");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
