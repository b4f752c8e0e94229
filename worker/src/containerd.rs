//! containerd's Content service over its unix socket, for a worker that reaches the engine's
//! containerd but not the content store's files: the two calls a save needs (`Info`, `Read`),
//! with their few messages written out by hand (containerd's `content.proto`,
//! `containerd.services.content.v1`) rather than a second gRPC stack. The only file that
//! speaks to containerd.
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
    }
}
