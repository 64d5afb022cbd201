// Tells the guest kernels that depend on this crate where the guest linker
// script is (they read it as DEP_MICROHV_GUEST_LINKER_SCRIPT in
// `link-guest.rs`, their shared build script).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rerun-if-changed=guest.ld");
    println!("cargo:linker-script={dir}/guest.ld");
}
