//! Framing of the container protocol on fd 3 (see `docs/PROTOCOL.md` §2):
//! `u32 len | u8 type | u32 header_len | header JSON | body`, integers big-endian.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const INIT: u8 = 1;
pub const INPUTS: u8 = 2;
pub const CANCEL: u8 = 3;
pub const SHUTDOWN: u8 = 4;
/// Worker to runner: go on after the checkpoint (memory snapshots).
pub const RESUME: u8 = 5;
pub const READY: u8 = 10;
pub const INIT_FAILURE: u8 = 11;
pub const OUTPUTS: u8 = 12;
/// Runner to worker: imports and snap=True hooks done, quiescent, checkpoint me now.
pub const SNAPSHOT_READY: u8 = 13;

/// Largest frame accepted from a container: one result at the API's cap plus headroom
/// for a batch (the runner refuses bigger results itself; a container that sends one
/// anyway is stopped, and the daemon never holds more than this for it).
pub const MAX_FRAME: usize = flare_api::MAX_RESULT_BYTES + (8 << 20);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub header: Bytes,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// Encodes one frame.
pub fn encode(kind: u8, header: &[u8], body: &[u8]) -> Bytes {
    let len = 1 + 4 + header.len() + body.len();
    let mut b = BytesMut::with_capacity(4 + len);
    b.put_u32(len as u32);
    b.put_u8(kind);
    b.put_u32(header.len() as u32);
    b.put_slice(header);
    b.put_slice(body);
    b.freeze()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len < 5 {
        return Err(FrameError::Malformed("shorter than its header"));
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    let mut buf = buf.freeze();
    let kind = buf[0];
    let hlen = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if 5 + hlen > len {
        return Err(FrameError::Malformed("header longer than the frame"));
    }
    let _ = buf.split_to(5);
    let header = buf.split_to(hlen);
    Ok(Some(Frame { kind, header, body: buf }))
}

/// Splits a batched body into the items' payloads by their lengths.
pub fn split_body(body: &Bytes, lens: &[usize]) -> Result<Vec<Bytes>, FrameError> {
    let total: usize = lens.iter().sum();
    if total != body.len() {
        return Err(FrameError::Malformed("item lengths do not add up to the body"));
    }
    let mut off = 0;
    Ok(lens
        .iter()
        .map(|l| {
            let s = body.slice(off..off + l);
            off += l;
            s
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_and_eof() {
        let mut data = encode(OUTPUTS, b"{\"a\":1}", b"xyz").to_vec();
        data.extend_from_slice(&encode(READY, b"{}", b""));
        let mut r = &data[..];
        let f = read(&mut r).await.unwrap().unwrap();
        assert_eq!((f.kind, &f.header[..], &f.body[..]), (OUTPUTS, &b"{\"a\":1}"[..], &b"xyz"[..]));
        let f = read(&mut r).await.unwrap().unwrap();
        assert_eq!(f.kind, READY);
        assert!(read(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_bad_frames() {
        let mut r = &[0u8, 0, 0, 6, 12, 0, 0, 0, 9, 0][..];
        assert!(matches!(read(&mut r).await, Err(FrameError::Malformed(_))));
        let body = Bytes::from_static(b"abcdef");
        assert_eq!(
            split_body(&body, &[2, 4]).unwrap(),
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cdef")]
        );
        assert!(split_body(&body, &[2, 2]).is_err());
    }
}
