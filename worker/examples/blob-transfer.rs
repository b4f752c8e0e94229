//! One blob through the worker's transfer engine, for the benchmark's comparison with other S3
//! clients on the same bytes: `blob-transfer put FILE KEY_NAME` uploads a file as the worker
//! uploads a layer, `blob-transfer get KEY_NAME FILE` downloads it as a restore does (ranged
//! GETs, several in flight, in order). Credentials and plan come from the environment:
//! the `export` lines of `cachectl credentials PROJECT --write`, plus `PART_SIZE_MIB`,
//! `MULTIPART_THRESHOLD_MIB` and `CONCURRENCY` (defaults: the coordinator's for the embedded store).

use std::time::Instant;

use futures::StreamExt;
use proto::v1 as pb;
use std::os::unix::fs::FileExt;
use worker::progress::Bar;
use worker::transfer::BlobStore;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: eval the export lines of cachectl credentials"))
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let credentials = pb::Credentials {
        access_key_id: env("AWS_ACCESS_KEY_ID"),
        secret_access_key: env("AWS_SECRET_ACCESS_KEY"),
        session_token: env("AWS_SESSION_TOKEN"),
        endpoint_url: env("AWS_ENDPOINT_URL"),
        region: env("AWS_REGION"),
        bucket: env("CACHE_S3_BUCKET"),
        prefix: env("CACHE_S3_PREFIX"),
        path_style: true,
        access: pb::Access::Write as i32,
        checksum_mode: "when_required".into(),
        ..Default::default()
    };
    let plan = pb::TransferPlan {
        part_size: env_number("PART_SIZE_MIB", 8) << 20,
        multipart_threshold: env_number("MULTIPART_THRESHOLD_MIB", 5120) << 20,
        max_concurrency: env_number("CONCURRENCY", 8) as u32,
        lease_id: String::new(),
    };
    let store = BlobStore::new(&credentials, &plan, None, std::time::Duration::from_secs(30));
    let started = Instant::now();
    let bytes = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["put", file, name] => {
            let size = std::fs::metadata(file).expect("the file to upload").len();
            store.upload_file(name, file.as_ref(), size, &Bar::none()).await.expect("upload");
            size
        }
        ["get", name, file] => {
            // Parts land in the file at their offsets as they arrive, several at once, as
            // s5cmd writes them.
            let size = store.stored_size(name).await.expect("head").expect("the blob is stored");
            let part_size = store.part_size_for(size);
            let out = std::sync::Arc::new(std::fs::File::create(file).expect("the output file"));
            out.set_len(size).expect("size the output file");
            futures::stream::iter(0..size.div_ceil(part_size))
                .map(|part| {
                    let (store, out, name) = (store.clone(), out.clone(), name.to_string());
                    async move {
                        let offset = part * part_size;
                        let bytes = store.download_range(&name, offset, part_size.min(size - offset)).await;
                        let bytes = bytes.expect("download");
                        let written = tokio::task::spawn_blocking(move || out.write_all_at(&bytes, offset));
                        written.await.expect("the writer").expect("write");
                    }
                })
                .buffer_unordered(plan.max_concurrency as usize)
                .collect::<()>()
                .await;
            size
        }
        _ => panic!("usage: blob-transfer put FILE NAME | get NAME FILE"),
    };
    let seconds = started.elapsed().as_secs_f64();
    println!("{bytes} bytes in {seconds:.2} s ({:.1} MB/s)", bytes as f64 / 1e6 / seconds);
}
