//! Decompressing qcow2 compressed clusters: raw deflate (zlib, QEMU's
//! default) or zstd frames, until a whole cluster is produced; the bytes
//! after that belong to the next compressed cluster and are ignored.

use std::io::{self, Read};

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::header::Compression;

fn corrupt(what: &str) -> io::Error {
    io::Error::other(format!("qcow2: corrupt compressed cluster: {what}"))
}

/// Decompresses `input` into exactly `cluster_size` bytes.
pub fn decompress_cluster(
    kind: Compression,
    input: &[u8],
    cluster_size: usize,
) -> io::Result<Vec<u8>> {
    match kind {
        Compression::Zlib => inflate(input, cluster_size),
        Compression::Zstd => unzstd(input, cluster_size),
    }
}

fn inflate(input: &[u8], cluster_size: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    let mut state = DecompressorOxide::new();
    // Raw deflate; the output buffer is the whole cluster, so no wrapping.
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, input, &mut out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == cluster_size => Ok(out),
        // The stream may end exactly at the cluster's end without its
        // final block seen: the input ran out of compressed sectors.
        TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress
            if written == cluster_size =>
        {
            Ok(out)
        }
        other => Err(corrupt(&format!(
            "deflate ended with {other:?} after {written} of {cluster_size} bytes"
        ))),
    }
}

fn unzstd(input: &[u8], cluster_size: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(cluster_size);
    let mut rest = input;
    // A cluster may be stored as several frames.
    while out.len() < cluster_size {
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut rest)
            .map_err(|e| corrupt(&format!("zstd: {e}")))?;
        let mut frame = Vec::new();
        decoder
            .by_ref()
            .take((cluster_size - out.len()) as u64)
            .read_to_end(&mut frame)
            .map_err(|e| corrupt(&format!("zstd: {e}")))?;
        if frame.is_empty() {
            return Err(corrupt("zstd: empty frame"));
        }
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_deflate_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut compressed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        compressed.extend_from_slice(&[0xaa; 300]); // the next cluster's bytes
        assert_eq!(
            decompress_cluster(Compression::Zlib, &compressed, 65536).unwrap(),
            data
        );
        assert!(decompress_cluster(Compression::Zlib, &[0xff; 40], 65536).is_err());
    }
}
