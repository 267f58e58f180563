//! Bodies: the one body type the proxy sends both ways, bounded buffering of requests, and the bounded
//! copy of responses taken for the record.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, Limited};

/// Boxed error of a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the proxy builds.
pub type Body = BoxBody<Bytes, BoxError>;

/// What a client's request body may be: hyper's `Incoming` from the listeners, any body (a full one,
/// a channel) when the pipeline is driven in-process.
pub trait RequestBody:
    HttpBody<Data = Bytes, Error: Into<BoxError>> + Send + Sync + Unpin + 'static
{
}

impl<B> RequestBody for B where
    B: HttpBody<Data = Bytes, Error: Into<BoxError>> + Send + Sync + Unpin + 'static
{
}

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A streamed body, passed through untouched.
pub fn stream<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Why a request body could not be buffered.
#[derive(Debug)]
pub enum BufferError {
    /// Over the limit (by `Content-Length` or while reading).
    TooLarge,
    /// The client's body broke (disconnect, malformed chunking).
    Read(BoxError),
}

/// Buffers a request body of at most `limit` bytes. A `Content-Length` over the limit is refused before
/// reading anything (so a client that sent `Expect: 100-continue` is not invited to upload).
pub async fn buffer_request(
    headers: &HeaderMap,
    body: impl RequestBody,
    limit: u64,
) -> Result<Bytes, BufferError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BufferError::TooLarge);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BufferError::TooLarge),
        Err(e) => Err(BufferError::Read(e)),
    }
}

/// An upstream response body read for the record.
#[derive(Debug)]
pub enum Captured<B> {
    /// The whole body, within the limit.
    Full(Bytes),
    /// Over the limit: what was read so far, and the rest still to stream.
    Over {
        /// Bytes already read.
        prefix: Bytes,
        /// The rest of the upstream body.
        rest: B,
    },
}

/// Reads a response body until it ends or passes `limit` bytes. A body that comes in one frame (most
/// do) is kept as it came, without a copy.
pub async fn capture<B>(mut body: B, limit: u64) -> Result<Captured<B>, B::Error>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers are not recorded (rare on responses; they are hop-by-hop for most proxies).
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            earlier => {
                if let Some(f) = earlier {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&data);
            }
        }
        let len = first.as_ref().map_or(buf.len(), Bytes::len);
        if len > limit {
            let prefix = first.take().unwrap_or_else(|| buf.split().freeze());
            return Ok(Captured::Over { prefix, rest: body });
        }
    }
    Ok(Captured::Full(first.unwrap_or_else(|| buf.freeze())))
}

/// A body that keeps `guard` alive until the body has been sent or dropped: how a connection knows a
/// response is still in flight, and an upstream slot is held while its answer streams.
#[derive(Debug)]
pub struct Guarded<G> {
    body: Body,
    _guard: G,
}

impl<G> Guarded<G> {
    /// `body`, holding `guard`.
    pub fn new(body: Body, guard: G) -> Self {
        Self {
            body,
            _guard: guard,
        }
    }
}

impl<G: Unpin> HttpBody for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Bytes already read followed by the rest of a streamed body.
#[derive(Debug)]
pub struct Prefixed<B> {
    prefix: Option<Bytes>,
    rest: B,
}

impl<B> Prefixed<B>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    /// A body that yields `prefix`, then `rest`.
    pub fn boxed_body(prefix: Bytes, rest: B) -> Body {
        Self {
            prefix: Some(prefix),
            rest,
        }
        .boxed()
    }
}

impl<B> HttpBody for Prefixed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        // Upper first: raising the lower bound past the old upper bound would panic.
        let mut h = SizeHint::new();
        if let Some(u) = rest.upper() {
            h.set_upper(u + extra);
        }
        h.set_lower(rest.lower() + extra);
        h
    }
}
