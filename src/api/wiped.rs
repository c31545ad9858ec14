//! The one response that carries a private key — FetchX509SVID's, with the key mayfly made
//! for the workload — encoded and sent so that no copy outlives the send.
//!
//! tonic's codec encodes into a buffer it keeps and frees without wiping, and prost
//! messages hold plain `Vec`s, so this method is served here, in front of the generated
//! service: each message is encoded once, into a buffer of exactly its size (never grown,
//! so never left behind in freed memory) that zeroizes itself when dropped, and handed to
//! HTTP/2 as that very buffer (`Bytes::from_owner`). h2 writes it to the socket and drops
//! its last handle, and the bytes are wiped. h2 copies at most the first 256 bytes of a
//! DATA frame into its own write buffer (the connection writes vectored; `AuthorityFix`
//! passes that on), so the key field is encoded last, after the certificate and the
//! bundle, which alone are longer. What is left is the kernel's socket buffer, until the
//! workload reads it.
//!
//! Only the wire shape lives here; the header check, attestation and the stream's
//! renewals are `workload`'s (`WorkloadApiService::x509_svid_frames`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use zeroize::Zeroizing;

use super::spiffe::{X509svid, X509svidRequest, X509svidResponse};
use super::workload::WorkloadApiService;
use crate::attest::PeerInfo;
use crate::keys::SecretDer;

/// The path of the method served here.
pub const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
/// A request to FetchX509SVID is an empty message; anything near this is not one.
const MAX_REQUEST_BYTES: usize = 4096;
/// Protobuf tags: X509SVIDResponse.svids (1, length-delimited), X509SVID.x509_svid_key (3).
const TAG_SVIDS: u8 = (1 << 3) | 2;
const TAG_SVID_KEY: u8 = (3 << 3) | 2;
/// gRPC's length-prefixed message header: a compression flag and a big-endian length.
const GRPC_HEADER: usize = 5;

/// An encoded gRPC message (header and protobuf) that zeroizes itself when h2 drops the
/// last handle to it.
struct WipedFrame(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for WipedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What one X509SVIDResponse with an SVID says.
pub struct SvidMessage<'a> {
    pub spiffe_id: &'a str,
    pub cert_der: &'a [u8],
    /// The server-made key, on the first message that carries this SVID only.
    pub key: Option<&'a SecretDer>,
    /// DER CA certificates, concatenated.
    pub bundle: &'a [u8],
    pub crls: &'a [Vec<u8>],
}

/// One X509SVIDResponse as a gRPC message in a self-wiping buffer; the key field last.
/// Decodes as the same message prost would encode (fields may come in any order).
pub fn svid_frame(m: &SvidMessage<'_>) -> Result<Bytes, Status> {
    // Nothing secret in these: encoded the ordinary way.
    let public = X509svid {
        spiffe_id: m.spiffe_id.to_owned(),
        x509_svid: m.cert_der.to_vec(),
        x509_svid_key: Vec::new(),
        bundle: m.bundle.to_vec(),
        hint: String::new(),
    }
    .encode_to_vec();
    let rest =
        X509svidResponse { svids: vec![], crl: m.crls.to_vec(), federated_bundles: Default::default() }.encode_to_vec();
    let key = m.key.map(SecretDer::expose).filter(|k| !k.is_empty());
    let key_field = key.map_or(0, |k| 1 + prost::encoding::encoded_len_varint(k.len() as u64) + k.len());
    let svid_len = public.len() + key_field;
    let message_len = 1 + prost::encoding::encoded_len_varint(svid_len as u64) + svid_len + rest.len();
    let total = GRPC_HEADER + message_len;

    let mut buf = Zeroizing::new(Vec::with_capacity(total));
    buf.push(0);
    buf.extend_from_slice(&u32::try_from(message_len).map_err(|_| too_large())?.to_be_bytes());
    buf.push(TAG_SVIDS);
    prost::encoding::encode_varint(svid_len as u64, &mut *buf);
    buf.extend_from_slice(&public);
    if let Some(k) = key {
        buf.push(TAG_SVID_KEY);
        prost::encoding::encode_varint(k.len() as u64, &mut *buf);
        buf.extend_from_slice(k);
    }
    buf.extend_from_slice(&rest);
    // Why check the capacity: a buffer that grew was reallocated, and the bytes moved out
    // of its first allocation were freed unwiped. Computed exactly, so it cannot; if it
    // ever did, the message is not sent.
    if buf.len() != total || buf.capacity() != total {
        tracing::error!(len = buf.len(), capacity = buf.capacity(), total, "svid message size miscomputed");
        return Err(Status::internal("internal error: the SVID message could not be encoded"));
    }
    Ok(Bytes::from_owner(WipedFrame(buf)))
}

/// A message that carries no secret (the empty set that withdraws an SVID), as a gRPC
/// message.
pub fn plain_frame(message: &X509svidResponse) -> Result<Bytes, Status> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(GRPC_HEADER + body.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(body.len()).map_err(|_| too_large())?.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(Bytes::from(frame))
}

fn too_large() -> Status {
    Status::internal("internal error: message over 4 GiB")
}

/// The generated SPIFFE Workload API service with FetchX509SVID answered here.
#[derive(Clone)]
pub struct WithWipedSvids<S> {
    inner: S,
    api: Arc<WorkloadApiService>,
}

impl<S> WithWipedSvids<S> {
    pub fn new(inner: S, api: Arc<WorkloadApiService>) -> Self {
        Self { inner, api }
    }
}

impl<S: NamedService> NamedService for WithWipedSvids<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for WithWipedSvids<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != FETCH_X509_SVID {
            return Box::pin(self.inner.call(request));
        }
        let api = self.api.clone();
        Box::pin(async move { Ok(fetch_x509_svid(api, request).await) })
    }
}

async fn fetch_x509_svid(api: Arc<WorkloadApiService>, request: http::Request<Body>) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let peer = parts.extensions.get::<PeerInfo>().cloned().unwrap_or_else(PeerInfo::without_credentials);
    let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers);
    // The request is one empty X509SVIDRequest; read it whole before answering, as tonic would.
    if let Err(status) = read_request(body).await {
        return status.into_http();
    }
    match api.x509_svid_frames(&metadata, peer).await {
        Ok(frames) => {
            let mut response = http::Response::new(Body::new(FrameBody { frames, done: false }));
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            response
        }
        Err(status) => status.into_http(),
    }
}

async fn read_request(body: Body) -> Result<X509svidRequest, Status> {
    let bytes = http_body_util::Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("request body: {e}")))?
        .to_bytes();
    let [0, a, b, c, d, message @ ..] = bytes.as_ref() else {
        return Err(Status::invalid_argument("a request is one uncompressed gRPC message"));
    };
    if u32::from_be_bytes([*a, *b, *c, *d]) as usize != message.len() {
        return Err(Status::invalid_argument("a request is one uncompressed gRPC message"));
    }
    X509svidRequest::decode(message).map_err(|e| Status::invalid_argument(format!("X509SVIDRequest: {e}")))
}

/// The response body: each frame from the stream as it comes, then the trailers
/// (`grpc-status` 0 when the stream ended, the status it ended with otherwise).
struct FrameBody {
    frames: mpsc::Receiver<Result<Bytes, Status>>,
    done: bool,
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let end = match self.frames.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(bad) = end.add_header(&mut trailers) {
            // Why this cannot loop: the fallback has a fixed, valid message.
            let _ = Status::internal(bad.message().escape_debug().to_string()).add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(key: Option<&SecretDer>) -> (Bytes, X509svidResponse) {
        let cert = vec![0x30; 600];
        let bundle = vec![0x31; 500];
        let crls = vec![vec![0x32; 80]];
        let frame = svid_frame(&SvidMessage {
            spiffe_id: "spiffe://example.org/api",
            cert_der: &cert,
            key,
            bundle: &bundle,
            crls: &crls,
        })
        .unwrap();
        let expected = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://example.org/api".into(),
                x509_svid: cert,
                x509_svid_key: key.map(|k| k.expose().to_vec()).unwrap_or_default(),
                bundle,
                hint: String::new(),
            }],
            crl: crls,
            federated_bundles: Default::default(),
        };
        (frame, expected)
    }

    #[test]
    fn the_hand_encoded_message_decodes_as_prost_would_encode_it() {
        let key = SecretDer::new(Zeroizing::new((0..138u8).collect()));
        for key in [Some(&key), None] {
            let (frame, expected) = message(key);
            assert_eq!(frame[0], 0, "uncompressed");
            let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
            assert_eq!(len, frame.len() - GRPC_HEADER);
            assert_eq!(X509svidResponse::decode(&frame[GRPC_HEADER..]).unwrap(), expected);
        }
    }

    #[test]
    fn the_key_comes_after_everything_h2_might_copy() {
        let key = SecretDer::new(Zeroizing::new(vec![0xa5; 138]));
        let (frame, _) = message(Some(&key));
        let at = frame.windows(138).position(|w| w == key.expose()).unwrap();
        assert!(at > 1024, "the key starts at byte {at}");
        assert_eq!(at + 138 + 1 + 1 + 80, frame.len(), "then only the CRL field");
    }
}
