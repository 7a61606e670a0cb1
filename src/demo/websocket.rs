//! The demo app's WebSocket endpoint, `/ws`: greets with a text message holding the app's name, then
//! echoes text and binary messages frame by frame, answers pings and answers a close with a close.
//!
//! Written against RFC 6455 by hand because the library has no WebSocket dependency and the demo
//! needs only the server side of a small subset: no extensions, no subprotocols, messages up to
//! [`MAX_PAYLOAD`] bytes per frame. The tests drive it with tokio-tungstenite, an independent client.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::{HeaderMap, Method, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Appended to the client's key before hashing (RFC 6455 section 1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Larger frames are refused with close code 1009 rather than buffered.
const MAX_PAYLOAD: u64 = 1 << 20;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const PROTOCOL_ERROR: u16 = 1002;
const TOO_BIG: u16 = 1009;

/// Why a request to `/ws` is not upgraded.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not an HTTP/1.1 `GET` with `Connection: upgrade` and `Upgrade: websocket`.
    NotAnUpgrade,
    /// A `Sec-WebSocket-Version` other than 13.
    Version,
    /// No `Sec-WebSocket-Key`, or one that is not 16 bytes in base64.
    Key,
}

/// The `Sec-WebSocket-Accept` value for a valid handshake request.
pub(super) fn accept(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<String, Refusal> {
    let upgrading = method == Method::GET
        && version == Version::HTTP_11
        && has_token(headers, CONNECTION, "upgrade")
        && has_token(headers, UPGRADE, "websocket");
    if !upgrading {
        return Err(Refusal::NotAnUpgrade);
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(Refusal::Version);
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .and_then(|key| key.to_str().ok())
        .map(str::trim)
        .ok_or(Refusal::Key)?;
    match STANDARD.decode(key) {
        Ok(nonce) if nonce.len() == 16 => Ok(accept_key(key)),
        _ => Err(Refusal::Key),
    }
}

/// Whether any `name` header lists `token` (comma-separated, case-insensitive).
fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

fn accept_key(key: &str) -> String {
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(ACCEPT_GUID.as_bytes());
    STANDARD.encode(sha1(&input))
}

/// Serves one upgraded connection until either side closes it.
pub(super) async fn serve<S>(mut stream: S, name: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if write_frame(&mut stream, true, OP_TEXT, name.as_bytes())
        .await
        .is_err()
    {
        return;
    }
    loop {
        let frame = match read_frame(&mut stream).await {
            // Gone without a close frame (or mid-frame): nothing left to answer.
            Err(_) => return,
            Ok(Err(code)) => {
                let _ = write_frame(&mut stream, true, OP_CLOSE, &code.to_be_bytes()).await;
                let _ = stream.shutdown().await;
                return;
            }
            Ok(Ok(frame)) => frame,
        };
        let written = match frame.opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                write_frame(&mut stream, frame.fin, frame.opcode, &frame.payload).await
            }
            OP_PING => write_frame(&mut stream, true, OP_PONG, &frame.payload).await,
            OP_PONG => Ok(()),
            _ => {
                // A close: answer with the same status code, then close the TCP connection first,
                // as the server should.
                let code = frame.payload.get(..2).unwrap_or_default();
                let _ = write_frame(&mut stream, true, OP_CLOSE, code).await;
                let _ = stream.shutdown().await;
                return;
            }
        };
        if written.is_err() {
            return;
        }
    }
}

/// One frame from the client, unmasked.
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Reads one client frame. The inner `Err` is a close code for a frame the protocol forbids.
async fn read_frame<R>(reader: &mut R) -> std::io::Result<Result<Frame, u16>>
where
    R: AsyncRead + Unpin,
{
    let mut head = [0u8; 2];
    reader.read_exact(&mut head).await?;
    let fin = head[0] & 0x80 != 0;
    let reserved = head[0] & 0x70;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7F {
        126 => u64::from(reader.read_u16().await?),
        127 => reader.read_u64().await?,
        len => u64::from(len),
    };
    let control = opcode & 0x8 != 0;
    let known = matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    );
    // Clients must mask; no extension was negotiated, so reserved bits must be clear; control
    // frames are short and never fragmented.
    if !masked || reserved != 0 || !known || (control && (!fin || len > 125)) {
        return Ok(Err(PROTOCOL_ERROR));
    }
    if len > MAX_PAYLOAD {
        return Ok(Err(TOO_BIG));
    }
    let mut mask = [0u8; 4];
    reader.read_exact(&mut mask).await?;
    let mut payload = vec![0u8; usize::try_from(len).expect("at most MAX_PAYLOAD")];
    reader.read_exact(&mut payload).await?;
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok(Ok(Frame {
        fin,
        opcode,
        payload,
    }))
}

/// Writes one unmasked server frame.
async fn write_frame<W>(
    writer: &mut W,
    fin: bool,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        len @ 0..=125 => frame.push(len as u8),
        len @ 126..=0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    writer.write_all(&frame).await?;
    writer.flush().await
}

/// SHA-1 (FIPS 180-4), for the handshake's accept key only — the one place the library needs it,
/// and nothing secret rides on it.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut state: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let bits = (data.len() as u64).wrapping_mul(8);
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bits.to_be_bytes());

    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = state;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let next = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = next;
        }
        for (total, add) in state.iter_mut().zip([a, b, c, d, e]) {
            *total = total.wrapping_add(add);
        }
    }

    let mut digest = [0u8; 20];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha1_matches_the_standard_vectors() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        // Two blocks: 56 bytes leave no room for the length in the first.
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn handshake_needs_get_http11_upgrade_version_13_and_a_key() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert(UPGRADE, "WebSocket".parse().unwrap());
        headers.insert(SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        headers.insert(
            SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        let ok = accept(&Method::GET, Version::HTTP_11, &headers);
        assert_eq!(ok.as_deref(), Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));

        assert_eq!(
            accept(&Method::POST, Version::HTTP_11, &headers),
            Err(Refusal::NotAnUpgrade)
        );
        assert_eq!(
            accept(&Method::GET, Version::HTTP_2, &headers),
            Err(Refusal::NotAnUpgrade)
        );
        let mut other = headers.clone();
        other.insert(SEC_WEBSOCKET_VERSION, "8".parse().unwrap());
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &other),
            Err(Refusal::Version)
        );
        let mut other = headers.clone();
        other.insert(SEC_WEBSOCKET_KEY, "c2hvcnQ=".parse().unwrap());
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &other),
            Err(Refusal::Key)
        );
        let mut other = headers;
        other.remove(UPGRADE);
        assert_eq!(
            accept(&Method::GET, Version::HTTP_11, &other),
            Err(Refusal::NotAnUpgrade)
        );
    }

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut frame = vec![first];
        if payload.len() < 126 {
            frame.push(0x80 | payload.len() as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[tokio::test]
    async fn greets_echoes_answers_pings_and_closes_with_the_clients_code() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(async move { serve(server, "app7").await });
        let mut script = client_frame(0x81, b"hi");
        script.extend(client_frame(0x02, &[7u8; 300]));
        script.extend(client_frame(0x89, b"p"));
        script.extend(client_frame(0x80, b"end"));
        script.extend(client_frame(0x88, &1000u16.to_be_bytes()));
        client.write_all(&script).await.unwrap();

        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        served.await.unwrap();
        let mut expected = vec![0x81, 4];
        expected.extend_from_slice(b"app7");
        expected.extend_from_slice(&[0x81, 2, b'h', b'i']);
        expected.extend_from_slice(&[0x02, 126, 1, 44]);
        expected.extend_from_slice(&[7u8; 300]);
        expected.extend_from_slice(&[0x8A, 1, b'p']);
        expected.extend_from_slice(&[0x80, 3, b'e', b'n', b'd']);
        expected.extend_from_slice(&[0x88, 2, 0x03, 0xE8]);
        assert_eq!(received, expected);
    }

    #[tokio::test]
    async fn an_unmasked_frame_is_a_protocol_error() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(async move { serve(server, "a").await });
        client.write_all(&[0x81, 1, b'x']).await.unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        served.await.unwrap();
        assert_eq!(received, [0x81, 1, b'a', 0x88, 2, 0x03, 0xEA]);
    }
}
