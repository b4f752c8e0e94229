//! Regenerates the Rust code of the `.proto` files and fails when the committed copy is stale.
//!
//! `UPDATE_GENERATED=1 cargo test -p proto --test codegen` rewrites `src/generated/`.

use std::path::Path;

#[test]
fn committed_generated_code_is_fresh() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = crate_dir.join("proto");
    let committed_dir = crate_dir.join("src/generated");
    let out_dir = tempfile::tempdir().expect("temporary directory");

    let file_descriptors =
        protox::compile([proto_dir.join("layercache/v1/cache.proto")], [&proto_dir]).expect("the .proto files compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir.path())
        .compile_fds(file_descriptors)
        .expect("code generation");

    let file_name = "layercache.v1.rs";
    let fresh = std::fs::read_to_string(out_dir.path().join(file_name)).expect("generated file");
    let committed_path = committed_dir.join(file_name);
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if fresh == committed {
        return;
    }
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
    assert!(
        !(in_ci && std::env::var_os("UPDATE_GENERATED").is_some()),
        "UPDATE_GENERATED is set in CI: the committed code must be fresh as it is"
    );
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::create_dir_all(&committed_dir).expect("create src/generated");
        std::fs::write(&committed_path, &fresh).expect("write generated code");
        return;
    }
    panic!(
        "{} is stale: run `UPDATE_GENERATED=1 cargo test -p proto --test codegen` and commit the result",
        committed_path.display()
    );
}
