//! The Docker engine CI starts: it answers at `DOCKER_HOST`, and a registry-free base image
//! can be made and run on it, as the save and restore tests will need.

use tests::{docker, docker_host, import_busybox_base, stderr_of, stdout_of};

#[test]
fn the_engine_answers_and_runs_a_busybox_base_image() {
    if docker_host().is_none() {
        return;
    }
    import_busybox_base("layer-cache-test-base:1");
    let ran = docker(&["run", "--rm", "--network", "none", "layer-cache-test-base:1", "echo", "hello from busybox"]);
    assert!(ran.status.success(), "{}", stderr_of(&ran));
    assert_eq!(stdout_of(&ran), "hello from busybox\n");
    let removed = docker(&["rmi", "layer-cache-test-base:1"]);
    assert!(removed.status.success(), "{}", stderr_of(&removed));
}
