//! containerd's Content and Leases services over its unix socket: the two calls a save needs
//! where it reaches the engine's containerd but not the content store's files (`Info`, `Read`),
//! and the three a restore needs to record the blobs it wrote into that store's folder itself
//! (`Write`'s commit, a lease's `Create` and `Delete`), with their few messages written out by
//! hand (containerd's `content.proto` and `leases.proto`) rather than a second gRPC stack. The
//! only file that speaks to containerd.
//!
//! Nothing read here is trusted: whoever reads a blob checks it against its digest as it
//! streams (`direct.rs`, `oci.rs`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

/// The containerd namespace the Docker engine keeps its images in.
const NAMESPACE: &str = "moby";
const NAMESPACE_HEADER: &str = "containerd-namespace";

const INFO_PATH: &str = "/containerd.services.content.v1.Content/Info";
const READ_PATH: &str = "/containerd.services.content.v1.Content/Read";
const WRITE_PATH: &str = "/containerd.services.content.v1.Content/Write";
const LEASE_CREATE_PATH: &str = "/containerd.services.leases.v1.Leases/Create";
const LEASE_DELETE_PATH: &str = "/containerd.services.leases.v1.Leases/Delete";
/// The header that puts a call's writes under a lease.
const LEASE_HEADER: &str = "containerd-lease";
/// The label after which containerd's collector drops a lease (RFC 3339).
const LEASE_EXPIRY_LABEL: &str = "containerd.io/gc.expire";
/// `WriteAction.COMMIT`.
const WRITE_ACTION_COMMIT: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
struct InfoRequest {
    #[prost(string, tag = "1")]
    digest: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct InfoResponse {
    #[prost(message, optional, tag = "1")]
    info: Option<Info>,
}

/// The fields of containerd's `Info` this worker reads (the others are skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct Info {
    #[prost(string, tag = "1")]
    digest: String,
    #[prost(int64, tag = "2")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReadContentRequest {
    #[prost(string, tag = "1")]
    digest: String,
    #[prost(int64, tag = "2")]
    offset: i64,
    /// 0: to the end.
    #[prost(int64, tag = "3")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReadContentResponse {
    #[prost(int64, tag = "1")]
    offset: i64,
    #[prost(bytes = "bytes", tag = "2")]
    data: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WriteContentRequest {
    #[prost(int32, tag = "1")]
    action: i32,
    #[prost(string, tag = "2")]
    r#ref: String,
    #[prost(int64, tag = "3")]
    total: i64,
    #[prost(string, tag = "4")]
    expected: String,
    #[prost(int64, tag = "5")]
    offset: i64,
}

/// The fields of containerd's `WriteContentResponse` this worker reads.
#[derive(Clone, PartialEq, prost::Message)]
struct WriteContentResponse {
    #[prost(int64, tag = "4")]
    offset: i64,
    #[prost(string, tag = "6")]
    digest: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CreateLeaseRequest {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(map = "string, string", tag = "3")]
    labels: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeleteLeaseRequest {
    #[prost(string, tag = "1")]
    id: String,
}

/// `google.protobuf.Empty`, and the answers whose fields this worker does not read.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// `seconds` since the Unix epoch as RFC 3339 in UTC (`2026-12-04T23:05:13Z`).
fn rfc3339(seconds: u64) -> String {
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (rest / 3600, rest % 3600 / 60, rest % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// A connection to containerd's Content service, in the engine's namespace. Its calls block:
/// they are made from blocking threads (a save's readers), on the runtime it was made on.
#[derive(Clone, Debug)]
pub struct ContentClient {
    channel: Channel,
    socket: PathBuf,
    runtime: tokio::runtime::Handle,
    /// How long any call may go without progress (`--stall-timeout`).
    stall_timeout: Duration,
}

fn io_error(socket: &Path, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("containerd at {}: {what}", socket.display()))
}

impl ContentClient {
    /// Connects to the containerd listening on `socket`.
    pub async fn connect(socket: &Path, stall_timeout: Duration) -> std::io::Result<ContentClient> {
        let path = socket.to_owned();
        // The URI is a placeholder: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://containerd.sock")
            .connect_timeout(stall_timeout)
            .timeout(stall_timeout.max(Duration::from_secs(1)));
        let connecting = endpoint.connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }));
        let channel = tokio::time::timeout(stall_timeout, connecting)
            .await
            .map_err(|_| io_error(socket, "no answer"))?
            .map_err(|error| io_error(socket, error))?;
        Ok(ContentClient {
            channel,
            socket: socket.to_owned(),
            runtime: tokio::runtime::Handle::current(),
            stall_timeout,
        })
    }

    /// The socket this client speaks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn request<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(NAMESPACE_HEADER, tonic::metadata::MetadataValue::from_static(NAMESPACE));
        request
    }

    /// Creates the lease `id`, which containerd's collector drops by itself after `lasts` (a
    /// worker killed before [`ContentClient::delete_lease`] leaves nothing held for long).
    pub async fn create_lease(&self, id: &str, lasts: Duration) -> std::io::Result<()> {
        let expiry = std::time::SystemTime::now() + lasts;
        let expiry = expiry.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let labels = [(LEASE_EXPIRY_LABEL.to_owned(), rfc3339(expiry))].into();
        let request = CreateLeaseRequest { id: id.to_owned(), labels };
        self.unary::<_, Empty>(LEASE_CREATE_PATH, Self::request(request)).await.map(drop)
    }

    /// Deletes the lease `id`: what it held is then kept only by what references it.
    pub async fn delete_lease(&self, id: &str) -> std::io::Result<()> {
        let request = Self::request(DeleteLeaseRequest { id: id.to_owned() });
        self.unary::<_, Empty>(LEASE_DELETE_PATH, request).await.map(drop)
    }

    /// Records in the engine's namespace, under the lease `lease`, the blob `digest` of `size`
    /// bytes that is already in the content store's folder: containerd's `Write`, whose writer
    /// sees the blob there (the default `content_sharing_policy = "shared"`) and commits it
    /// without a byte sent. A blob not in that folder, or of another size, fails the commit;
    /// one the namespace holds already is recorded.
    pub async fn commit_in_place(&self, digest: &str, size: u64, lease: &str) -> std::io::Result<()> {
        let size = i64::try_from(size).map_err(|_| io_error(&self.socket, "a blob too large"))?;
        let commit = WriteContentRequest {
            action: WRITE_ACTION_COMMIT,
            r#ref: format!("cache-worker-{}", proto::digest::digest_hex(digest)),
            total: size,
            expected: digest.to_owned(),
            // The writer's offset: a commit at 0 would truncate the blob and find it empty.
            offset: size,
        };
        let mut request = Self::request(futures::stream::iter([commit]));
        let lease = tonic::metadata::MetadataValue::try_from(lease).map_err(|error| io_error(&self.socket, error))?;
        request.metadata_mut().insert(LEASE_HEADER, lease);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|error| io_error(&self.socket, error))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(WRITE_PATH);
        let codec = tonic_prost::ProstCodec::<WriteContentRequest, WriteContentResponse>::default();
        let answer = match grpc.streaming(request, path, codec).await {
            Ok(response) => response.into_inner().message().await,
            Err(status) => Err(status),
        };
        match answer {
            Ok(Some(answer)) if answer.digest == digest && answer.offset == size => Ok(()),
            Ok(answer) => Err(io_error(&self.socket, format!("committing {digest} was answered {answer:?}"))),
            Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(status) => Err(io_error(&self.socket, status.message())),
        }
    }

    async fn unary<Q, A>(&self, path: &'static str, request: tonic::Request<Q>) -> std::io::Result<A>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|error| io_error(&self.socket, error))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let codec = tonic_prost::ProstCodec::<Q, A>::default();
        match grpc.unary(request, path, codec).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(io_error(&self.socket, status.message())),
        }
    }

    /// The size of the blob `digest`, or `None` when containerd does not hold it.
    pub async fn size(&self, digest: &str) -> std::io::Result<Option<u64>> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|error| io_error(&self.socket, error))?;
        let request = Self::request(InfoRequest { digest: digest.to_owned() });
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(INFO_PATH);
        let codec = tonic_prost::ProstCodec::<InfoRequest, InfoResponse>::default();
        match grpc.unary(request, path, codec).await {
            Ok(response) => {
                let info = response.into_inner().info.unwrap_or_default();
                if info.digest != digest || info.size < 0 {
                    return Err(io_error(
                        &self.socket,
                        format!("asked about {digest}, answered about {:?}", info.digest),
                    ));
                }
                Ok(Some(info.size as u64))
            }
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(io_error(&self.socket, status.message())),
        }
    }

    /// The blob `digest` as a blocking reader, and its size (an absent blob is `NotFound`); call
    /// it from a blocking thread.
    pub fn open(&self, digest: &str) -> std::io::Result<(u64, BlobReader)> {
        self.runtime.block_on(async {
            let absent =
                || std::io::Error::new(std::io::ErrorKind::NotFound, format!("containerd holds no blob {digest}"));
            let size = self.size(digest).await?.ok_or_else(absent)?;
            let mut grpc = tonic::client::Grpc::new(self.channel.clone());
            grpc.ready().await.map_err(|error| io_error(&self.socket, error))?;
            let request = Self::request(ReadContentRequest { digest: digest.to_owned(), offset: 0, size: 0 });
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(READ_PATH);
            let codec = tonic_prost::ProstCodec::<ReadContentRequest, ReadContentResponse>::default();
            let stream = grpc.server_streaming(request, path, codec).await;
            let stream = stream.map_err(|status| io_error(&self.socket, status.message()))?.into_inner();
            let reader = BlobReader { client: self.clone(), stream, piece: Bytes::new(), offset: 0, size };
            Ok((size, reader))
        })
    }

    /// The size of the blob `digest`, or `None` when containerd does not hold it; call it from
    /// a blocking thread.
    pub fn size_blocking(&self, digest: &str) -> std::io::Result<Option<u64>> {
        self.runtime.block_on(self.size(digest))
    }
}

/// A blob streamed from containerd's `Read`, each piece at the offset it claims.
pub struct BlobReader {
    client: ContentClient,
    stream: tonic::Streaming<ReadContentResponse>,
    piece: Bytes,
    offset: u64,
    size: u64,
}

impl Read for BlobReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() {
            let ContentClient { runtime, socket, stall_timeout, .. } = &self.client;
            let next = runtime.block_on(tokio::time::timeout(*stall_timeout, self.stream.message()));
            let message = next
                .map_err(|_| io_error(socket, format!("a read made no progress for {} s", stall_timeout.as_secs())))?
                .map_err(|status| io_error(socket, status.message()))?;
            let Some(message) = message else {
                if self.offset != self.size {
                    return Err(io_error(socket, format!("the blob ended at {} of {} bytes", self.offset, self.size)));
                }
                return Ok(0);
            };
            if message.offset != self.offset as i64 {
                return Err(io_error(
                    socket,
                    format!("a piece at {} came where {} was due", message.offset, self.offset),
                ));
            }
            self.offset += message.data.len() as u64;
            if self.offset > self.size {
                return Err(io_error(socket, format!("the blob runs past its {} bytes", self.size)));
            }
            self.piece = message.data;
        }
        let n = buffer.len().min(self.piece.len());
        buffer[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn the_messages_encode_as_containerds() {
        // `ReadContentRequest{digest: "sha256:ab", offset: 3}`, as protoc encodes it.
        let encoded = ReadContentRequest { digest: "sha256:ab".into(), offset: 3, size: 0 }.encode_to_vec();
        assert_eq!(encoded, [&[0x0a, 9][..], b"sha256:ab", &[0x10, 3]].concat());
        // An `Info` with fields this worker skips (created_at, labels) still decodes.
        let info = [&[0x0a, 9][..], b"sha256:ab", &[0x10, 0x80, 0x01], &[0x1a, 0], &[0x2a, 2, 0x0a, 0]].concat();
        let response = [&[0x0a, info.len() as u8][..], &info].concat();
        let decoded = InfoResponse::decode(&response[..]).unwrap().info.unwrap();
        assert_eq!((decoded.digest.as_str(), decoded.size), ("sha256:ab", 128));
        let piece = ReadContentResponse::decode(&[0x08, 5, 0x12, 2, b'h', b'i'][..]).unwrap();
        assert_eq!((piece.offset, &piece.data[..]), (5, &b"hi"[..]));
        // `WriteContentRequest{action: COMMIT, ref: "r", total: 3, expected: "d", offset: 3}`.
        let commit = WriteContentRequest { action: 2, r#ref: "r".into(), total: 3, expected: "d".into(), offset: 3 };
        assert_eq!(commit.encode_to_vec(), [0x08, 2, 0x12, 1, b'r', 0x18, 3, 0x22, 1, b'd', 0x28, 3]);
        let labels = [("k".to_owned(), "v".to_owned())].into();
        let lease = CreateLeaseRequest { id: "l".into(), labels }.encode_to_vec();
        assert_eq!(lease, [0x0a, 1, b'l', 0x1a, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);
    }

    #[test]
    fn expiry_times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_425_513), "2026-12-04T23:05:13Z");
    }
}
