//! A bodiless GET or HEAD to a plain HTTP/1.1 backend, exchanged by switchyard itself rather than
//! through hyper's client: the request's head is written in one call, the response's head is
//! parsed with `httparse` in the request's own task, and a body that arrived with its head is
//! handed on whole, its connection back in the pool before the client has it. Every other
//! request (a body, an upgrade, TLS, HTTP/2) goes through hyper as before.
//!
//! hyper's client drives each connection from a task of its own and passes the response through a
//! channel, which costs about a third of a keep-alive request's instructions (BENCHMARKS.md,
//! session 9). The framing rules are RFC 9112's (§6.3): no body for HEAD, 1xx, 204 and 304;
//! chunked when `Transfer-Encoding` ends in it; else `Content-Length`; else until the backend
//! closes, which also keeps the connection from being reused.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio_util::io::poll_read_buf;

use super::pool::Stream;
use super::UpstreamBody;

/// The most header fields a response head may have (hyper's default too).
const MAX_HEADERS: usize = 100;

/// The largest response head read: hyper's limit, so that a response is held to the same one
/// whichever path its request took (nginx's default is 4–8 KiB).
const MAX_HEAD: usize = 8192 + 4096 * 100;

/// The largest chunk-size line, or trailer section, of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// What a read asks for at least: a keep-alive response usually comes whole in one.
const READ_SIZE: usize = 8 * 1024;

/// Whether `request` is a GET or HEAD with no body to send: what
/// [`super::ConnPool::send_bodiless`] takes.
pub fn bodiless(request: &Request<UpstreamBody>) -> bool {
    (request.method() == Method::GET || request.method() == Method::HEAD)
        && request.body().upload().is_none()
}

/// How an exchange on a connection failed.
#[derive(Debug)]
pub enum Failure {
    /// The connection closed or broke before any byte of a response came: on a reused connection,
    /// the backend closed it as the request was written (the keep-alive race).
    Closed(io::Error),
    /// The response was malformed, or broke off in its head.
    Broken(io::Error),
    /// No response head within `timeouts.response_header`.
    TimedOut,
}

/// The head of `request`, as hyper's client would write it: the origin-form target, HTTP/1.1, and
/// the fields in the map's order with lowercase names.
fn encode_head(request: &Request<UpstreamBody>) -> Vec<u8> {
    let target = request
        .uri()
        .path_and_query()
        .map_or("", |p| p.as_str())
        .as_bytes();
    // As `PathAndQuery`'s `Display` (which hyper writes): a target such as `?x=1`, from the
    // absolute form `http://host?x=1`, gets its `/`.
    let slash = !matches!(target.first(), Some(b'/' | b'*'));
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let method = request.method().as_str().as_bytes();
    let mut head = Vec::with_capacity(method.len() + target.len() + fields + 15);
    head.extend_from_slice(method);
    head.push(b' ');
    if slash {
        head.push(b'/');
    }
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Sends `request`'s head on `stream` and reads the response's. `Ok` carries the response, its
/// body, and the stream if the body is already whole and the connection can carry another
/// request (else the body holds the stream, or it is closed).
pub async fn exchange(
    mut stream: Box<dyn Stream>,
    request: &Request<UpstreamBody>,
) -> Result<(Response<ResponseBody>, Option<Box<dyn Stream>>), Failure> {
    let head = encode_head(request);
    stream.write_all(&head).await.map_err(Failure::Closed)?;
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    // Whether any byte of an answer came (an informational one counts): the backend then saw the
    // request, and a close is no longer the keep-alive race.
    let mut answered = false;
    loop {
        if buf.capacity() - buf.len() < READ_SIZE / 2 {
            buf.reserve(READ_SIZE);
        }
        let read = std::future::poll_fn(|cx| poll_read_buf(Pin::new(&mut *stream), cx, &mut buf))
            .await
            .and_then(|n| match n {
                0 => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "backend closed the connection",
                )),
                n => Ok(n),
            });
        if let Err(error) = read {
            return Err(if answered {
                Failure::Broken(error)
            } else {
                Failure::Closed(error)
            });
        }
        answered = true;
        // Informational answers (100, 103) are skipped, as hyper does; a 101 is returned.
        while let Some(parsed) = parse_head(&mut buf, request.method() == Method::HEAD)? {
            if parsed.status.is_informational() && parsed.status != StatusCode::SWITCHING_PROTOCOLS
            {
                continue;
            }
            return Ok(finish(parsed, stream, buf));
        }
        if buf.len() > MAX_HEAD {
            return Err(Failure::Broken(invalid("response head too large")));
        }
    }
}

/// A response head, parsed.
struct Parsed {
    status: StatusCode,
    response: Response<()>,
    framing: Framing,
    keep_alive: bool,
}

/// Parses one response head off the front of `buf`; `None` while it is incomplete.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, Failure> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(Failure::Broken(invalid(error))),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
        .map_err(|_| Failure::Broken(invalid("invalid status")))?;
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // Kept unless canonical, an empty one too, as hyper's client keeps it: the client then sees
    // the backend's status line on either path.
    let reason = parsed.reason.unwrap_or("").as_bytes();
    let reason = (status.canonical_reason().map(str::as_bytes) != Some(reason))
        .then(|| hyper::ext::ReasonPhrase::try_from(reason.to_vec()).ok())
        .flatten();
    // The fields that decide the framing are read here, from the bytes, rather than looked up in
    // the map afterwards (each lookup hashes its name).
    let mut delimiting = Delimiting::default();
    // Offsets, since the buffer is frozen below (the values share it without a copy).
    let base = buf.as_ptr() as usize;
    let mut spans = Vec::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Failure::Broken(invalid("invalid header name")))?;
        delimiting.note(&name, field.value);
        let start = field.value.as_ptr() as usize - base;
        spans.push((name, start, start + field.value.len()));
    }
    // A response without a body is framed by what it answers (RFC 9112 §6.3, rule 1 before the
    // others): its framing fields are not checked, as hyper's client does not check them.
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        if delimiting.transfer_encoding && version == Version::HTTP_10 {
            // An HTTP/1.0 peer cannot chunk (RFC 9112 §6.1); hyper refuses it too.
            return Err(Failure::Broken(invalid(
                "transfer-encoding in an HTTP/1.0 response",
            )));
        }
        // A Transfer-Encoding overrides any Content-Length, valid or not (§6.3, rule 3).
        if let (Some(error), false) = (delimiting.length_error, delimiting.transfer_encoding) {
            return Err(Failure::Broken(invalid(error)));
        }
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, start, end) in spans {
        // With a Transfer-Encoding, a Content-Length is wrong and must not be passed on (RFC 9112
        // §6.3): the client would be told a length the body does not have.
        if delimiting.transfer_encoding && name == header::CONTENT_LENGTH {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| Failure::Broken(invalid("invalid header value")))?;
        headers.append(name, value);
    }
    let framing = if bodiless {
        Framing::Length(0)
    } else if delimiting.transfer_encoding {
        if delimiting.chunked_last {
            Framing::Chunked(Chunked::Size)
        } else {
            Framing::Close
        }
    } else {
        delimiting.length.map_or(Framing::Close, Framing::Length)
    };
    // Not for HTTP/1.0 unless it says keep-alive, `Connection: close`, a body that ends with the
    // connection, or both a
    // Transfer-Encoding and a Content-Length (a smuggling attempt or a broken backend: RFC 9112
    // §6.3 has the connection closed after it).
    let closes = (version != Version::HTTP_11 && !delimiting.keep_alive)
        || delimiting.close
        || matches!(framing, Framing::Close)
        || (delimiting.transfer_encoding && delimiting.content_length);
    let keep_alive = !closes;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(reason) = reason {
        response.extensions_mut().insert(reason);
    }
    Ok(Some(Parsed {
        status,
        response,
        framing,
        keep_alive,
    }))
}

/// What a response head says of its body's end and its connection (RFC 9112 §6.3, §9.6).
#[derive(Default)]
struct Delimiting {
    /// A `Transfer-Encoding` field came.
    transfer_encoding: bool,
    /// The last transfer coding is `chunked`.
    chunked_last: bool,
    /// A `Content-Length` field came.
    content_length: bool,
    /// The `Content-Length`, every value of which must agree.
    length: Option<u64>,
    /// Why the `Content-Length` cannot be used, if it cannot: an error only where it frames the
    /// body.
    length_error: Option<&'static str>,
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`, which an HTTP/1.0 response needs to be followed by another.
    keep_alive: bool,
}

impl Delimiting {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.chunked_last = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONTENT_LENGTH {
            self.content_length = true;
            for part in value.split(|&b| b == b',') {
                let Some(n) = parse_decimal(part.trim_ascii()) else {
                    self.length_error.get_or_insert("invalid content-length");
                    continue;
                };
                if self.length.is_some_and(|l| l != n) {
                    self.length_error
                        .get_or_insert("conflicting content-length");
                }
                self.length = Some(n);
            }
        } else if name == header::CONNECTION {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
}

/// A Content-Length: decimal digits only, no sign, at most hyper's largest length (it keeps the
/// two values above for its own use), so that both paths refuse the same answers.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |n, &d| {
            let digit = (d as char).to_digit(10)?;
            n.checked_mul(10)?.checked_add(u64::from(digit))
        })
        .filter(|&n| n <= u64::MAX - 2)
}

/// The response, with its body: whole if it came with the head, else streamed from the stream.
fn finish(
    parsed: Parsed,
    stream: Box<dyn Stream>,
    mut buf: BytesMut,
) -> (Response<ResponseBody>, Option<Box<dyn Stream>>) {
    let Parsed {
        response,
        framing,
        keep_alive,
        status,
    } = parsed;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Never asked for on this path (the request path answers 502); the stream is done.
        return (response.map(|()| ResponseBody::Whole(None)), None);
    }
    if let Framing::Length(n) = framing {
        if (buf.len() as u64) >= n {
            let body = buf.split_to(n as usize).freeze();
            // Bytes past the body belong to no request: the backend is out of step.
            let reusable = keep_alive && buf.is_empty();
            let body = (!body.is_empty()).then_some(body);
            return (
                response.map(|()| ResponseBody::Whole(body)),
                reusable.then_some(stream),
            );
        }
    }
    let body = RawBody {
        stream: Some(stream),
        buf,
        framing,
        keep_alive,
        done: false,
        broken: false,
    };
    (response.map(|()| ResponseBody::Raw(body)), None)
}

fn invalid(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// How a body ends.
#[derive(Debug)]
enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// At the last chunk.
    Chunked(Chunked),
    /// When the backend closes the connection.
    Close,
}

/// Where a chunked body's decoding is.
#[derive(Debug)]
enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section.
    Trailers,
}

/// A response body from a backend: hyper's, or one read here.
#[derive(Debug)]
pub enum ResponseBody {
    /// Through hyper's client.
    Hyper(Incoming),
    /// Read here, still arriving.
    Raw(RawBody),
    /// Read here, whole (none for an empty body).
    Whole(Option<Bytes>),
}

impl ResponseBody {
    /// The whole body, if it has already been read (taking it).
    pub fn take_whole(&mut self) -> Option<Option<Bytes>> {
        match self {
            ResponseBody::Whole(data) => Some(data.take()),
            _ => None,
        }
    }

    /// The connection, once the body has ended and it can carry another request.
    pub fn take_reusable(&mut self) -> Option<Box<dyn Stream>> {
        match self {
            ResponseBody::Raw(raw) if raw.done && raw.keep_alive && raw.buf.is_empty() => {
                raw.stream.take()
            }
            _ => None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ResponseBody::Raw(body) => body.poll_frame(cx).map_err(Into::into),
            ResponseBody::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Hyper(body) => body.is_end_stream(),
            ResponseBody::Raw(body) => body.done && !body.broken,
            ResponseBody::Whole(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Hyper(body) => body.size_hint(),
            ResponseBody::Raw(RawBody {
                framing: Framing::Length(n),
                ..
            }) => SizeHint::with_exact(*n),
            ResponseBody::Raw(_) => SizeHint::default(),
            ResponseBody::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// A response body read from the connection as it arrives.
#[derive(Debug)]
pub struct RawBody {
    stream: Option<Box<dyn Stream>>,
    /// Read and not yet handed on.
    buf: BytesMut,
    framing: Framing,
    /// The response allows the connection to carry another request once its body has ended.
    keep_alive: bool,
    done: bool,
    /// Ended by a failure (then also `done`).
    broken: bool,
}

impl std::fmt::Debug for dyn Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stream")
    }
}

impl RawBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.decode() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if self.done => return Poll::Ready(None),
                Ok(None) => {}
                Err(error) => {
                    self.fail();
                    return Poll::Ready(Some(Err(error)));
                }
            }
            let Some(stream) = self.stream.as_deref_mut() else {
                return Poll::Ready(None);
            };
            if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
                self.buf.reserve(READ_SIZE);
            }
            match ready!(poll_read_buf(Pin::new(stream), cx, &mut self.buf)) {
                Ok(0) if matches!(self.framing, Framing::Close) => {
                    self.done = true;
                    self.stream = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.fail();
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the connection before the body's end",
                    ))));
                }
                Ok(_) => {}
                Err(error) => {
                    self.fail();
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
    }

    fn fail(&mut self) {
        self.done = true;
        self.broken = true;
        self.keep_alive = false;
        self.stream = None;
    }

    /// The next frame decodable from the buffer; `None` when more must be read first (or the body
    /// has just ended: `done`).
    fn decode(&mut self) -> io::Result<Option<Frame<Bytes>>> {
        loop {
            match &mut self.framing {
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(self.buf.split().freeze())));
                }
                Framing::Length(left) => {
                    if *left == 0 {
                        self.done = true;
                        return Ok(None);
                    }
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(self.buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.done = true;
                    }
                    return Ok(Some(Frame::data(self.buf.split_to(n).freeze())));
                }
                Framing::Chunked(state) => match state {
                    Chunked::Size => {
                        let Some(end) = memchr::memchr(b'\n', &self.buf) else {
                            if self.buf.len() > MAX_CHUNK_LINE {
                                return Err(invalid("chunk-size line too long"));
                            }
                            return Ok(None);
                        };
                        // CRLF only, and no other CR in the line: a bare LF or CR is where
                        // parsers disagree, and a response read one way by switchyard and
                        // another by the backend would leave the connection out of step.
                        let line = match self.buf[..end].strip_suffix(b"\r") {
                            Some(line) if !line.contains(&b'\r') => line,
                            _ => return Err(invalid("chunk-size line not ended by CRLF")),
                        };
                        let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                        // Whitespace may come before a chunk extension (RFC 9112 §7.1.1).
                        let digits = match digits.iter().rposition(|&b| b != b' ' && b != b'\t') {
                            Some(last) => &digits[..=last],
                            None => &[][..],
                        };
                        let size =
                            parse_hex(digits).ok_or_else(|| invalid("invalid chunk size"))?;
                        self.buf.advance(end + 1);
                        *state = if size == 0 {
                            Chunked::Trailers
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Chunked::Data(left) => {
                        if self.buf.is_empty() {
                            return Ok(None);
                        }
                        let n = (*left).min(self.buf.len() as u64) as usize;
                        *left -= n as u64;
                        if *left == 0 {
                            *state = Chunked::DataEnd;
                        }
                        return Ok(Some(Frame::data(self.buf.split_to(n).freeze())));
                    }
                    Chunked::DataEnd => {
                        if self.buf.len() < 2 && b"\r\n".starts_with(&self.buf) {
                            return Ok(None);
                        }
                        if !self.buf.starts_with(b"\r\n") {
                            return Err(invalid("chunk data not followed by CRLF"));
                        }
                        self.buf.advance(2);
                        *state = Chunked::Size;
                    }
                    Chunked::Trailers => {
                        // Ends at an empty line: at once when there are no trailers.
                        let end = if self.buf.starts_with(b"\r\n") {
                            Some(2)
                        } else {
                            memchr::memmem::find(&self.buf, b"\r\n\r\n").map(|at| at + 4)
                        };
                        let Some(end) = end else {
                            if self.buf.len() > MAX_TRAILERS {
                                return Err(invalid("trailer section too large"));
                            }
                            return Ok(None);
                        };
                        let section = self.buf.split_to(end).freeze();
                        self.done = true;
                        return Ok(trailers(&section)?.map(Frame::trailers));
                    }
                },
            }
        }
    }
}

/// A chunk size: hexadecimal digits, no more than a `u64` holds.
fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    // Bounded by overflow, not by digits: leading zeros are allowed (`1*HEXDIG`), and the line
    // itself by `MAX_CHUNK_LINE`.
    digits.iter().try_fold(0u64, |n, &d| {
        let digit = (d as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

/// The fields of a trailer section (ending with its empty line), if any.
fn trailers(section: &Bytes) -> io::Result<Option<HeaderMap>> {
    if section.len() <= 2 {
        return Ok(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = httparse::parse_headers(section, &mut fields).map_err(invalid)?;
    // The section must end where httparse ends it, or the two readings disagree (see `Size`).
    let httparse::Status::Complete((len, fields)) = parsed else {
        return Err(invalid("incomplete trailer section"));
    };
    if len != section.len() {
        return Err(invalid("malformed trailer section"));
    }
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(invalid)?;
        let value = HeaderValue::from_bytes(field.value).map_err(invalid)?;
        map.append(name, value);
    }
    Ok((!map.is_empty()).then_some(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(framing: Framing, bytes: &[u8]) -> RawBody {
        RawBody {
            stream: None,
            buf: BytesMut::from(bytes),
            framing,
            keep_alive: true,
            done: false,
            broken: false,
        }
    }

    fn decode_all(body: &mut RawBody) -> io::Result<(Vec<u8>, Option<HeaderMap>)> {
        let mut data = Vec::new();
        let mut trailers = None;
        while !body.done {
            match body.decode()? {
                Some(frame) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                None if body.done => break,
                None => return Err(invalid("incomplete")),
            }
        }
        Ok((data, trailers))
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let mut body = body_of(
            Framing::Chunked(Chunked::Size),
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
        );
        let (data, trailers) = decode_all(&mut body).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "42");
        assert!(body.buf.is_empty());

        let mut body = body_of(
            Framing::Chunked(Chunked::Size),
            b"A\r\n0123456789\r\n0\r\n\r\n",
        );
        let (data, trailers) = decode_all(&mut body).unwrap();
        assert_eq!(data, b"0123456789");
        assert!(trailers.is_none());
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            &b"zz\r\nhi\r\n0\r\n\r\n"[..],
            b"2\r\nhiXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"\r\n",
            // Bare LFs and stray CRs, where parsers disagree.
            b"2\nhi\r\n0\r\n\r\n",
            b"2\r\r\nhi\r\n0\r\n\r\n",
            b"2\r\nhi\n0\r\n\r\n",
            b"2;a\rb\r\nhi\r\n0\r\n\r\n",
            b"0\r\nx: 1\n\r\ny: 2\r\n\r\n",
        ] {
            let mut body = body_of(Framing::Chunked(Chunked::Size), bad);
            assert!(
                decode_all(&mut body).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A response head's framing, reuse, and the bytes left after the head.
    fn parse(head: &[u8], head_request: bool) -> Result<(Framing, bool, usize), &'static str> {
        let mut buf = BytesMut::from(head);
        match parse_head(&mut buf, head_request) {
            Ok(Some(parsed)) => Ok((parsed.framing, parsed.keep_alive, buf.len())),
            Ok(None) => Err("partial"),
            Err(_) => Err("error"),
        }
    }

    #[test]
    fn response_heads_set_framing_and_reuse() {
        let (framing, keep_alive, rest) =
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false).unwrap();
        assert!(matches!(framing, Framing::Length(3)) && keep_alive && rest == 3);
        let (framing, ..) = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true).unwrap();
        assert!(matches!(framing, Framing::Length(0)));
        let (framing, keep_alive, _) = parse(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(matches!(framing, Framing::Chunked(_)) && keep_alive);
        let (framing, keep_alive, _) = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert!(matches!(framing, Framing::Close) && !keep_alive);
        let (_, keep_alive, _) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(!keep_alive);
        let (_, keep_alive, _) =
            parse(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false).unwrap();
        assert!(!keep_alive);
        let (_, keep_alive, _) = parse(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(keep_alive);
        assert_eq!(
            parse(
                b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false
            )
            .err(),
            Some("error")
        );
        let (framing, keep_alive, _) = parse(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(matches!(framing, Framing::Chunked(_)) && !keep_alive);
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
                false
            )
            .err(),
            Some("error")
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false).err(),
            Some("error")
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-le", false).err(),
            Some("partial")
        );
        assert_eq!(
            parse(b"HTTP/1.1 2000 OK\r\n\r\n", false).err(),
            Some("error")
        );
    }

    /// An answer without a body is framed by what it answers, whatever its framing fields say,
    /// and a Transfer-Encoding overrides any Content-Length, even an unreadable one: hyper's
    /// client reads them so, and both paths must refuse the same answers.
    #[test]
    fn framing_fields_are_checked_only_where_they_frame_a_body() {
        for (head, head_request) in [
            (&b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n"[..], true),
            (
                b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.0 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1, 2\r\n\r\n",
                false,
            ),
        ] {
            let framing = parse(head, head_request).map(|(framing, ..)| framing);
            assert!(
                matches!(framing, Ok(Framing::Length(0))),
                "{:?}: {framing:?}",
                String::from_utf8_lossy(head)
            );
        }
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: abc\r\n\r\n"[..],
        );
        let parsed = parse_head(&mut buf, false).unwrap().unwrap();
        assert!(matches!(parsed.framing, Framing::Chunked(_)) && !parsed.keep_alive);
        assert!(!parsed.response.headers().contains_key("content-length"));
        // Where the length frames the body, it is still checked.
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n", false).err(),
            Some("error")
        );
    }

    /// Lengths as hyper bounds them: a Content-Length up to `u64::MAX - 2`, a chunk size up to
    /// what a `u64` holds, with any number of leading zeros.
    #[test]
    fn lengths_are_bounded_as_hyper_bounds_them() {
        assert_eq!(parse_decimal(b"18446744073709551613"), Some(u64::MAX - 2));
        assert_eq!(parse_decimal(b"18446744073709551614"), None);
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_hex(b"00000000000000005"), Some(5));
        assert_eq!(parse_hex(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_hex(b"10000000000000000"), None);
        let mut body = body_of(
            Framing::Chunked(Chunked::Size),
            b"00000000000000005\r\nhello\r\n0\r\n\r\n",
        );
        assert_eq!(decode_all(&mut body).unwrap().0, b"hello");
    }
}
