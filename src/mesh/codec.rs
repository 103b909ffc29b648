//! request-response codecs for our protocols: the framing in `protocol`,
//! bound to libp2p's stream API.

use std::io;

use futures::{AsyncRead, AsyncWrite};
use libp2p::request_response::Codec;
use libp2p::StreamProtocol;

use super::protocol::{
    self, AvailRequest, AvailResponse, ChunkRequest, ChunkResponse, MAX_AVAIL_FRAME, MAX_RAFT_FRAME,
};

#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkCodec;

impl Codec for ChunkCodec {
    type Protocol = StreamProtocol;
    type Request = ChunkRequest;
    type Response = ChunkResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ChunkRequest> {
        protocol::read_chunk_request(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ChunkResponse> {
        protocol::read_chunk_response(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ChunkRequest,
    ) -> io::Result<()> {
        protocol::write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: ChunkResponse,
    ) -> io::Result<()> {
        protocol::write_chunk_response(io, resp).await
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AvailCodec;

impl Codec for AvailCodec {
    type Protocol = StreamProtocol;
    type Request = AvailRequest;
    type Response = AvailResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<AvailRequest> {
        protocol::read_frame(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<AvailResponse> {
        let r: AvailResponse = protocol::read_frame_max(io, MAX_AVAIL_FRAME).await?;
        if r.holdings.len() > protocol::MAX_AVAIL_PAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "availability page over the limit",
            ));
        }
        Ok(r)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: AvailRequest,
    ) -> io::Result<()> {
        protocol::write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: AvailResponse,
    ) -> io::Result<()> {
        protocol::write_frame_max(io, &resp, MAX_AVAIL_FRAME).await
    }
}

/// Raft frames: opaque bytes, bounded by `MAX_RAFT_FRAME` both ways.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftCodec;

impl Codec for RaftCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        protocol::read_frame_max(io, MAX_RAFT_FRAME).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        protocol::read_frame_max(io, MAX_RAFT_FRAME).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        protocol::write_frame_max(io, &req, MAX_RAFT_FRAME).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Vec<u8>,
    ) -> io::Result<()> {
        protocol::write_frame_max(io, &resp, MAX_RAFT_FRAME).await
    }
}
