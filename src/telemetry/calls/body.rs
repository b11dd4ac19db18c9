//! The bodies of calls as they pass: gRPC messages counted by their
//! five-byte frame headers, and a response's trailers ending its call.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;
use tonic::Code;

use super::{status_in, Call};

/// The response body as the server sends it.
pub type CallBody<B> = Counted<B>;

pin_project_lite::pin_project! {
    /// A body whose gRPC messages are counted, and for a response, whose
    /// trailers end the call.
    pub struct Counted<B> {
        #[pin]
        pub(super) inner: B,
        pub(super) frames: FrameCounter,
        pub(super) counter: Option<IntCounter>,
        pub(super) call: Option<Call>,
    }

    impl<B> PinnedDrop for Counted<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.abandon();
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = std::task::ready!(this.inner.poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(counter)) = (frame.data_ref(), this.counter.as_ref()) {
                    let messages = this.frames.count(data.chunk());
                    if messages > 0 {
                        counter.inc_by(messages);
                    }
                }
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(call) = this.call.take() {
                        call.end(status_in(trailers).unwrap_or(Code::Unknown));
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(call) = this.call.take() {
                    call.end(Code::Internal);
                }
            }
            // A response body that ends without trailers ends no call
            // (gRPC always sends them); a request body's `call` is None.
            None => {
                if let Some(call) = this.call.take() {
                    call.end(Code::Unknown);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds gRPC messages in a byte stream: each is a flag byte, a 4-byte
/// big-endian length and that many bytes, split across frames anyhow.
#[derive(Default)]
pub(super) struct FrameCounter {
    /// Bytes of the current message's payload still to skip.
    remaining: u64,
    /// Header bytes seen of the next message (0 to 4).
    header: [u8; 5],
    header_len: usize,
}

impl FrameCounter {
    /// Counts the messages whose header ends in `data`.
    fn count(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = data.len().min(self.remaining as usize);
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = data.len().min(5 - self.header_len);
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                let [_, a, b, c, d] = self.header;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.header_len = 0;
                messages += 1;
            }
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            out.push(0);
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn counts_messages_split_anywhere() {
        let bytes = framed(&[b"", b"hello", &[7; 300], b"x"]);
        for split in 1..bytes.len() {
            let mut counter = FrameCounter::default();
            let n: u64 = bytes.chunks(split).map(|c| counter.count(c)).sum();
            assert_eq!(n, 4, "chunks of {split}");
            assert_eq!((counter.remaining, counter.header_len), (0, 0));
        }
    }
}
