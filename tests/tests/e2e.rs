//! End-to-end tests over real parts: coordinator processes, the real binaries, aws-sdk-s3 and
//! the AWS CLI against the embedded S3 endpoint.

mod e2e {
    mod awscli_isolation;
    mod bad_days;
    mod buildkit;
    mod containerd_store;
    mod dashboard;
    mod deploy_files;
    mod docker_engine;
    mod durability;
    mod embedded_s3_scope;
    mod engine_root;
    mod frozen_coordinator;
    mod frozen_engine;
    mod full_disk;
    mod garbage;
    mod hostile_clients;
    mod in_process;
    mod incremental_save;
    mod lost_blobs;
    mod multi_stage;
    mod operator_view;
    mod postgres_restart;
    mod projects_and_credentials;
    mod pull_request_trust;
    mod quotas;
    mod registry_view;
    mod replicas;
    mod restore_pace;
    mod reused_hosts;
    mod s3_store;
    mod save_restore;
    mod scope_allowances;
    mod scoped_tokens;
    mod single_flight;
    mod step_reuse;
    mod traces;
    mod transfers;
    mod view_lost_blobs;
}
