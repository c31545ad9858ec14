//! Interoperability filter for the workload socket: gRPC C-core clients (grpcio, which
//! py-spiffe uses, since 1.57) and grpc-java send the socket *path* as the HTTP/2
//! `:authority` of a Unix-socket call. hyper's h2 server rejects that as malformed
//! (RST_STREAM PROTOCOL_ERROR), so such a SPIFFE client could not call mayfly at all.
//!
//! `AuthorityFix` sits on the read side of each connection: it passes every HTTP/2 frame
//! through untouched except header blocks, which it decodes (HPACK, fluke-hpack), replaces
//! an `:authority` that is not a valid URI authority with `localhost` (what grpc-go and
//! tonic send on Unix sockets), and re-encodes for the server. Every header block is
//! re-encoded, so the encoder's dynamic table stays in step with the server's decoder
//! (both at the HTTP/2 default of 4096 bytes). The authority carries no meaning on a Unix
//! socket: attestation, not any header, identifies the caller. The write side is untouched.
//!
//! Only clients that need it pay for it: when a connection's first header block has nothing
//! to fix (grpc-go, tonic, the Rust SPIFFE clients send `localhost`), that block goes to the
//! server as the client sent it and the filter steps aside for the rest of the connection.
//! The server's HPACK decoder has then seen exactly the client's encoding, so the two stay
//! in step; hyper enforces the same frame and header-list limits on what follows.

use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The server's SETTINGS_MAX_FRAME_SIZE (HTTP/2 default; tonic does not change it). A frame
/// announcing more ends the connection before any of it is buffered (RFC 9113 §4.2).
const MAX_FRAME: usize = 16_384;
/// A header block (HEADERS + CONTINUATIONs) larger than this ends the connection.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The server's SETTINGS_MAX_HEADER_LIST_SIZE (hyper's default, 16 KiB; tonic does not change
/// it), counted as RFC 9113 §6.5.2 counts it: name + value + 32 octets per field. A block that
/// decodes to more ends the connection, and no more than this is ever held decoded: HPACK
/// lets a 1-byte reference stand for a 4 KiB table entry, so a 64 KiB block could otherwise
/// decode to 256 MiB.
const MAX_HEADER_LIST: usize = 16 * 1024;
/// The HPACK dynamic table size the server allows (SETTINGS_HEADER_TABLE_SIZE, HTTP/2
/// default). A size update above it ends the connection instead of growing the table.
const MAX_TABLE: usize = 4096;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8192;
/// What grpc-go and tonic clients send as the authority on a Unix socket.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

struct PendingBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received (passed on unchanged if the block needs no fix).
    frames: Vec<u8>,
}

pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from the client, not yet processed.
    input: Vec<u8>,
    /// Processed bytes waiting to be handed to the server.
    output: Vec<u8>,
    preface_seen: bool,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<PendingBlock>,
    decoder: fluke_hpack::Decoder<'static>,
    encoder: fluke_hpack::Encoder<'static>,
    eof: bool,
    /// A header block was filtered already (only the first can open the pass-through).
    filtered_one: bool,
    /// The first header block needed no fix: everything is passed on unread from now on.
    passthrough: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = fluke_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        Self {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            preface_seen: false,
            pending: None,
            decoder,
            encoder: fluke_hpack::Encoder::new(),
            eof: false,
            filtered_one: false,
            passthrough: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves every complete frame from `input` to `output`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_seen {
            if self.input.len() < PREFACE.len() {
                return Ok(());
            }
            if &self.input[..PREFACE.len()] != PREFACE {
                // Not HTTP/2 with prior knowledge: pass through; the server will refuse it.
                self.output.append(&mut self.input);
                self.preface_seen = true;
                return Ok(());
            }
            self.output.extend(self.input.drain(..PREFACE.len()));
            self.preface_seen = true;
        }
        loop {
            if self.passthrough {
                self.output.append(&mut self.input);
                return Ok(());
            }
            if self.input.len() < FRAME_HEADER {
                return Ok(());
            }
            let len = usize::from(self.input[0]) << 16 | usize::from(self.input[1]) << 8 | usize::from(self.input[2]);
            if len > MAX_FRAME {
                return Err(protocol("a frame larger than SETTINGS_MAX_FRAME_SIZE (16 KiB)"));
            }
            if self.input.len() < FRAME_HEADER + len {
                return Ok(());
            }
            let kind = self.input[3];
            let flags = self.input[4];
            let stream = u32::from_be_bytes([self.input[5], self.input[6], self.input[7], self.input[8]]) & 0x7fff_ffff;
            let frame: Vec<u8> = self.input.drain(..FRAME_HEADER + len).collect();
            let payload = &frame[FRAME_HEADER..];
            match (kind, &mut self.pending) {
                (HEADERS, None) => {
                    let (priority, block) = split_headers(flags, payload)?;
                    if flags & END_HEADERS != 0 {
                        self.emit(stream, flags, priority, block, &frame)?;
                    } else {
                        let block = block.to_vec();
                        self.pending = Some(PendingBlock { stream, flags, priority, block, frames: frame });
                    }
                }
                (CONTINUATION, Some(pending)) if pending.stream == stream => {
                    pending.block.extend_from_slice(payload);
                    pending.frames.extend_from_slice(&frame);
                    if pending.block.len() > MAX_HEADER_BLOCK {
                        return Err(protocol("header block too large"));
                    }
                    if flags & END_HEADERS != 0
                        && let Some(p) = self.pending.take()
                    {
                        self.emit(p.stream, p.flags, p.priority, &p.block, &p.frames)?;
                    }
                }
                (_, Some(_)) => return Err(protocol("a header block was interrupted by another frame")),
                (_, None) => self.output.extend_from_slice(&frame),
            }
        }
    }

    /// Decodes one header block, fixes `:authority`, and writes it back as HEADERS (+
    /// CONTINUATION) frames without padding — or, for a connection's first block with
    /// nothing to fix, writes `frames` (the block as received) and opens the pass-through.
    fn emit(
        &mut self,
        stream: u32,
        flags: u8,
        priority: Option<[u8; 5]>,
        block: &[u8],
        frames: &[u8],
    ) -> io::Result<()> {
        check_size_updates(block)?;
        let decoder = &mut self.decoder;
        let mut fixed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut list_size = 0usize;
        let mut rewrote = false;
        // Why catch_unwind: the decoder panics on some malformed integers; a bad client must
        // lose its connection, not take a server task down with it.
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            decoder.decode_with_cb(block, |name, value| {
                // The table entries a field borrows are counted, never copied, past the limit.
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size > MAX_HEADER_LIST {
                    return;
                }
                let value = if name.as_ref() == b":authority" && Authority::try_from(value.as_ref()).is_err() {
                    rewrote = true;
                    LOCAL_AUTHORITY.to_vec()
                } else {
                    value.into_owned()
                };
                fixed.push((name.into_owned(), value));
            })
        }))
        .map_err(|_| protocol("malformed header block"))?
        .map_err(|e| protocol(&format!("malformed header block: {e:?}")))?;
        if list_size > MAX_HEADER_LIST {
            return Err(protocol("a header list larger than SETTINGS_MAX_HEADER_LIST_SIZE (16 KiB)"));
        }
        let first = !std::mem::replace(&mut self.filtered_one, true);
        if first && !rewrote {
            self.output.extend_from_slice(frames);
            self.passthrough = true;
            return Ok(());
        }
        let mut encoded = Vec::new();
        if let Some(p) = priority {
            encoded.extend_from_slice(&p);
        }
        self.encoder.encode_into(fixed.iter().map(|(n, v)| (n.as_slice(), v.as_slice())), &mut encoded)?;
        let base = flags & (END_STREAM | PRIORITY);
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let (kind, mut f) = if first { (HEADERS, base) } else { (CONTINUATION, 0) };
            if last {
                f |= END_HEADERS;
            }
            write_frame(&mut self.output, kind, f, stream, chunk);
            first = false;
        }
        Ok(())
    }
}

impl AuthorityFix<()> {
    /// Runs the filter over a whole client byte stream at once: what the server would be
    /// handed, or why the connection ends (the fuzz target `http2_filter`).
    pub fn filter(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut fix = AuthorityFix::new(());
        for chunk in input.chunks(READ_CHUNK) {
            fix.input.extend_from_slice(chunk);
            fix.process()?;
            if fix.input.len() >= FRAME_HEADER + MAX_FRAME {
                return Err(protocol("too much unprocessed input"));
            }
        }
        Ok(std::mem::take(&mut fix.output))
    }
}

/// Walks a header block's field representations (RFC 7541 §6) without decoding them, and
/// refuses one whose dynamic table size update carries a malformed integer: fluke-hpack
/// 0.3.1 panics on exactly that (`update_max_dynamic_size` unwraps the integer), and a
/// panic must not be what a stranger can make the daemon do, even a caught one. Everything
/// else malformed is the decoder's to refuse.
fn check_size_updates(block: &[u8]) -> io::Result<()> {
    let bad = || protocol("malformed header block");
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        let (prefix, then) = match first {
            b if b & 0x80 != 0 => (7, 0),    // indexed field
            b if b & 0xc0 == 0x40 => (6, 1), // literal, incremental indexing
            b if b & 0xe0 == 0x20 => (5, 0), // dynamic table size update
            _ => (4, 1),                     // literal without indexing / never indexed
        };
        let (index, used) = hpack_integer(&block[at..], prefix).ok_or_else(bad)?;
        at += used;
        if then == 1 {
            // A new name (index 0) is a string before the value string.
            let strings = if index == 0 { 2 } else { 1 };
            for _ in 0..strings {
                let (len, used) = hpack_integer(block.get(at..).ok_or_else(bad)?, 7).ok_or_else(bad)?;
                at = at.checked_add(used).and_then(|a| a.checked_add(len)).ok_or_else(bad)?;
                if at > block.len() {
                    return Err(bad());
                }
            }
        }
    }
    Ok(())
}

/// An HPACK integer (RFC 7541 §5.1) with an `prefix`-bit prefix: its value and the bytes it
/// took; `None` if it is cut short or longer than 5 bytes (the decoder's own limit).
fn hpack_integer(buf: &[u8], prefix: u32) -> Option<(usize, usize)> {
    let mask = (1usize << prefix) - 1;
    let mut value = usize::from(*buf.first()?) & mask;
    if value < mask {
        return Some((value, 1));
    }
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn split_headers(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&n, rest) = body.split_first().ok_or_else(|| protocol("empty padded HEADERS"))?;
        pad = usize::from(n);
        body = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let p: [u8; 5] =
            body.get(..5).and_then(|p| p.try_into().ok()).ok_or_else(|| protocol("short HEADERS priority"))?;
        priority = Some(p);
        body = &body[5..];
    }
    let end = body.len().checked_sub(pad).ok_or_else(|| protocol("HEADERS padding longer than the frame"))?;
    Ok((priority, &body[..end]))
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    // Why the casts cannot truncate: payload ≤ MAX_FRAME (16 KiB) < 2^24.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn protocol(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("http/2 from the workload socket client: {why}"))
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // End of stream: hand over whatever is left as it is.
                    this.eof = true;
                    this.output.append(&mut this.input);
                }
                Poll::Ready(Ok(())) => {
                    this.input.extend_from_slice(read.filled());
                    this.process()?;
                    // `process` takes every complete frame and refuses one announcing more
                    // than MAX_FRAME, so what stays is part of one frame; checked all the same.
                    if this.input.len() >= FRAME_HEADER + MAX_FRAME {
                        return Poll::Ready(Err(protocol("too much unprocessed input")));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Why pass vectored writes on: without them h2 copies up to 1 KiB of every DATA frame
    // into its own write buffer (256 bytes with them), which would reach the key of an
    // X509-SVID message (`api::wiped` keeps the key past the first 1 KiB, but no further
    // copy is better).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    fn headers_frame(
        encoder: &mut fluke_hpack::Encoder<'_>,
        stream: u32,
        headers: &[(&[u8], &[u8])],
        padded: bool,
    ) -> Vec<u8> {
        let block = encoder.encode(headers.iter().copied());
        let mut payload = Vec::new();
        let mut flags = END_HEADERS;
        if padded {
            flags |= PADDED;
            payload.push(3);
        }
        payload.extend_from_slice(&block);
        if padded {
            payload.extend_from_slice(&[0, 0, 0]);
        }
        let mut out = Vec::new();
        write_frame(&mut out, HEADERS, flags, stream, &payload);
        out
    }

    /// Reads everything the filter produces and decodes the header blocks as a server would.
    async fn through_filter(input: Vec<u8>) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut filtered = Vec::new();
        AuthorityFix::new(input.as_slice()).read_to_end(&mut filtered).await.unwrap();
        assert_eq!(&filtered[..PREFACE.len()], PREFACE);
        let mut rest = &filtered[PREFACE.len()..];
        let mut decoder = fluke_hpack::Decoder::new();
        let mut blocks = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            if rest[3] == HEADERS {
                blocks.push(decoder.decode(&rest[FRAME_HEADER..FRAME_HEADER + len]).unwrap());
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        blocks
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut client = fluke_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, 0x4, 0, 0, &[]); // SETTINGS, passed through
        let first: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":authority", b"/run/mayfly/workload.sock"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ];
        input.extend(headers_frame(&mut client, 1, first, false));
        // The second request reuses the client's dynamic table entries (indexed fields) and pads.
        input.extend(headers_frame(&mut client, 3, first, true));
        let ok: &[(&[u8], &[u8])] = &[(b":method", b"POST"), (b":authority", b"localhost:50051"), (b":path", b"/x")];
        input.extend(headers_frame(&mut client, 5, ok, false));
        let blocks = through_filter(input).await;
        assert_eq!(blocks.len(), 3);
        for block in &blocks[..2] {
            let authority = block.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(authority.1, b"localhost");
            assert!(block.iter().any(|(n, v)| n == b"workload.spiffe.io" && v == b"true"));
            assert!(block.iter().any(|(n, v)| n == b":path" && v == b"/SpiffeWorkloadAPI/FetchX509SVID"));
        }
        assert!(
            blocks[2].iter().any(|(n, v)| n == b":authority" && v == b"localhost:50051"),
            "a valid authority is kept"
        );
    }

    #[tokio::test]
    async fn a_client_whose_first_block_needs_no_fix_is_passed_through_byte_for_byte() {
        let mut client = fluke_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, 0x4, 0, 0, &[]);
        let ok: &[(&[u8], &[u8])] = &[(b":method", b"POST"), (b":authority", b"localhost"), (b":path", b"/x")];
        // Padded, so a re-encoding would show: the server must get the client's own bytes.
        input.extend(headers_frame(&mut client, 1, ok, true));
        write_frame(&mut input, 0x0, END_STREAM, 1, b"body");
        // Later blocks are the server's to judge (hyper refuses a path authority itself).
        let bad: &[(&[u8], &[u8])] = &[(b":method", b"POST"), (b":authority", b"/run/x.sock"), (b":path", b"/y")];
        input.extend(headers_frame(&mut client, 3, bad, false));
        let mut filtered = Vec::new();
        AuthorityFix::new(input.as_slice()).read_to_end(&mut filtered).await.unwrap();
        assert_eq!(filtered, input);
        // The same bytes from a client whose first block had a path authority are rewritten.
        let mut client = fluke_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&mut client, 1, bad, false));
        input.extend(headers_frame(&mut client, 3, ok, true));
        let blocks = through_filter(input).await;
        assert!(blocks[0].iter().any(|(n, v)| n == b":authority" && v == b"localhost"));
        assert!(blocks[1].iter().any(|(n, v)| n == b":path" && v == b"/x"));
    }

    #[tokio::test]
    async fn a_block_split_over_continuation_frames_is_reassembled_and_fixed() {
        let mut client = fluke_hpack::Encoder::new();
        let block =
            client.encode([(&b":method"[..], &b"POST"[..]), (b":authority", b"/tmp/a b/socket"), (b":path", b"/x")]);
        let (head, tail) = block.split_at(block.len() / 2);
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, HEADERS, 0, 1, head);
        write_frame(&mut input, CONTINUATION, END_HEADERS, 1, tail);
        let blocks = through_filter(input).await;
        assert_eq!(blocks.len(), 1);
        assert!(blocks[0].iter().any(|(n, v)| n == b":authority" && v == b"localhost"));
        assert!(blocks[0].iter().any(|(n, v)| n == b":path" && v == b"/x"));
    }

    #[tokio::test]
    async fn a_malformed_header_block_ends_the_connection_without_a_panic() {
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, HEADERS, END_HEADERS, 1, &[0x3f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut out = Vec::new();
        let err = AuthorityFix::new(input.as_slice()).read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// A literal field with incremental indexing and a new name, no Huffman coding.
    fn indexed_literal(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = vec![0x40];
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value);
        out
    }

    fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut n: usize) {
        let max = (1usize << prefix) - 1;
        if n < max {
            out.push(first | n as u8);
            return;
        }
        out.push(first | max as u8);
        n -= max;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }

    async fn refused(input: Vec<u8>) -> String {
        let mut out = Vec::new();
        let err = AuthorityFix::new(input.as_slice()).read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        err.to_string()
    }

    #[tokio::test]
    async fn a_frame_announcing_more_than_16_kib_is_refused_before_it_is_buffered() {
        let mut input = PREFACE.to_vec();
        // The frame header says 1 MiB; only its first bytes follow. The filter must not wait
        // for (or keep) the rest.
        input.extend_from_slice(&[0x10, 0x00, 0x00, HEADERS, END_HEADERS, 0, 0, 0, 1]);
        input.extend_from_slice(&[0x82; 100]);
        assert!(refused(input).await.contains("SETTINGS_MAX_FRAME_SIZE"));
        // Any frame type: a DATA frame of 16 KiB + 1 is refused as well.
        let mut input = PREFACE.to_vec();
        write_frame_unchecked(&mut input, 0x0, 0, 1, MAX_FRAME + 1);
        assert!(refused(input).await.contains("SETTINGS_MAX_FRAME_SIZE"));
    }

    fn write_frame_unchecked(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, len: usize) {
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.resize(out.len() + len, 0);
    }

    #[tokio::test]
    async fn a_block_of_references_to_a_large_entry_is_refused_at_the_header_list_limit() {
        // One 4,000-byte entry in the dynamic table, then 16,000 one-byte references to it
        // (index 62, the newest dynamic entry): 16 KiB on the wire, 64 MB decoded.
        let mut block = indexed_literal(b"x-fill", &[b'a'; 4000]);
        block.extend(std::iter::repeat_n(0x80 | 62, 16_000 - block.len()));
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, HEADERS, 0, 1, &block[..MAX_FRAME.min(block.len())]);
        write_frame(&mut input, CONTINUATION, END_HEADERS, 1, &block[MAX_FRAME.min(block.len())..]);
        assert!(refused(input).await.contains("SETTINGS_MAX_HEADER_LIST_SIZE"));
    }

    #[tokio::test]
    async fn a_header_list_just_under_the_limit_passes() {
        // Three references to a 4,000-byte entry: 3 × 4,038 + 4,038 ≈ 16 KB, under 16 KiB.
        let mut block = vec![0x83, 0x86, 0x84]; // :method POST, :scheme http, :path /
        block.extend(indexed_literal(b"x-fill", &[b'a'; 4000]));
        block.extend([0x80 | 62, 0x80 | 62, 0x80 | 62]);
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, HEADERS, END_HEADERS, 1, &block);
        let blocks = through_filter(input).await;
        assert_eq!(blocks[0].iter().filter(|(n, _)| n == b"x-fill").count(), 4);
    }

    #[tokio::test]
    async fn a_table_size_update_above_4096_is_refused() {
        let mut block = Vec::new();
        hpack_int(&mut block, 0x20, 5, 1 << 20);
        block.extend(indexed_literal(b"x-big", &[b'b'; 100]));
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, HEADERS, END_HEADERS, 1, &block);
        assert!(refused(input).await.contains("malformed header block"));
    }

    /// The input cargo-fuzz found (fuzz/corpus/http2_filter/size-update-panic): a dynamic table
    /// size update whose integer runs past 5 bytes, on which fluke-hpack 0.3.1 panics. It is
    /// refused before the decoder sees it.
    #[test]
    fn a_size_update_with_a_malformed_integer_is_refused_before_the_decoder_sees_it() {
        let mut block = vec![0x82]; // :method GET
        block.extend_from_slice(&[0x3f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(check_size_updates(&block).is_err());
        let mut input = PREFACE.to_vec();
        write_frame(&mut input, HEADERS, END_HEADERS, 1, &block);
        let err = AuthorityFix::filter(&input).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A well-formed update at the start of a block, and literals, pass the walk.
        let mut ok = Vec::new();
        hpack_int(&mut ok, 0x20, 5, 4096);
        ok.extend(indexed_literal(b"x-a", b"b"));
        ok.push(0x82);
        assert!(check_size_updates(&ok).is_ok());
        assert_eq!(hpack_integer(&[0x1f, 0x9a, 0x0a], 5), Some((1337, 3)));
    }

    #[test]
    fn the_fuzz_crash_input_ends_the_connection_without_a_panic() {
        let crash: &[u8] = &[
            0, 0, 0, 4, 0, 96, 0, 0, 0, 0, 0, 136, 1, 4, 0, 0, 0, 1, 131, 134, 64, 0, 1, 0, 0, 0, 0, 183, 183, 183,
            183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183,
            183, 183, 183, 183, 183, 183, 135, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183,
            183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183,
            183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183,
            183, 183, 183, 63, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 0, 0, 1, 0,
            0, 0, 0, 136, 183, 183, 183, 183, 183, 183, 183, 183, 183, 183, 0, 0, 0, 174, 108, 121, 47, 119, 111, 0, 0,
            0, 0, 242, 107, 108, 111, 97, 100, 46, 115, 111, 99, 0, 0, 0, 4, 255, 255, 255, 255, 255, 255, 6, 15, 1,
            12, 0, 0, 0, 58, 97, 117, 115, 114, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0,
        ];
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(crash);
        let hook = std::panic::take_hook();
        let panicked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = panicked.clone();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().contains("fluke-hpack")) {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }));
        let result = AuthorityFix::filter(&input);
        std::panic::set_hook(hook);
        assert!(result.is_err());
        assert!(!panicked.load(std::sync::atomic::Ordering::SeqCst), "the decoder panicked");
    }
}
