//! The artifact download: resume with `Range` after an interruption (also from a `.part` an earlier process
//! left), a server that ignores ranges, the size cap (endless data), the rate limit.

mod support;

use nkudo_edge::update::download::{download, DownloadError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_range() {
    let body = Arc::new(data(200_000));
    let calls = Arc::new(AtomicUsize::new(0));
    let (b, c) = (body.clone(), calls.clone());
    let server = Server::start(Arc::new(move |req: &Request| {
        let mut r = serve_range(req, &b);
        // The first answer breaks off after 70 000 bytes.
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            r.cut_after = Some(70_000);
        }
        r
    }))
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("a.tar.gz.part");
    let http = reqwest::Client::new();
    let url = format!("{}/artifact", server.base);
    let e = download(&http, &url, &part, body.len() as u64, None).await.unwrap_err();
    assert!(matches!(e, DownloadError::Transient(_)), "{e:?}");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 70_000);
    download(&http, &url, &part, body.len() as u64, None).await.unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), *body);
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("range"), None);
    assert_eq!(reqs[1].header("range"), Some("bytes=70000-"));
    // Complete already: no request at all.
    download(&http, &url, &part, body.len() as u64, None).await.unwrap();
    assert_eq!(server.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_server_ignoring_ranges_restarts_from_zero() {
    let body = Arc::new(data(50_000));
    let b = body.clone();
    let server = Server::start(Arc::new(move |_req: &Request| Response::bytes(200, b.to_vec()))).await;
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("a.part");
    std::fs::write(&part, &body[..10_000]).unwrap();
    download(
        &reqwest::Client::new(),
        &format!("{}/a", server.base),
        &part,
        body.len() as u64,
        None,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), *body);
    assert_eq!(server.requests.lock().unwrap()[0].header("range"), Some("bytes=10000-"));
}

#[tokio::test]
async fn more_than_the_signed_size_is_refused() {
    // Announced too long.
    let server = Server::start(Arc::new(|_req: &Request| Response::bytes(200, vec![7u8; 5000]))).await;
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("a.part");
    let e = download(
        &reqwest::Client::new(),
        &format!("{}/a", server.base),
        &part,
        4000,
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, DownloadError::Permanent(m) if m.contains("endless-data")),
        "{e:?}"
    );
    assert!(std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) <= 4000);

    // Chunked, no length announced: stopped at the cap.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 2048];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 1000];
        for _ in 0..100 {
            if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err()
                || s.write_all(&chunk).await.is_err()
                || s.write_all(b"\r\n").await.is_err()
            {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    });
    let part2 = tmp.path().join("b.part");
    let e = download(&reqwest::Client::new(), &format!("http://{addr}/b"), &part2, 4500, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, DownloadError::Permanent(m) if m.contains("endless-data")),
        "{e:?}"
    );
    assert!(std::fs::metadata(&part2).unwrap().len() <= 4500);
}

#[tokio::test]
async fn errors_are_transient_and_a_too_long_part_is_discarded() {
    let body = Arc::new(data(3000));
    let b = body.clone();
    let fail = Arc::new(AtomicUsize::new(0));
    let f = fail.clone();
    let server = Server::start(Arc::new(move |req: &Request| {
        if f.fetch_add(1, Ordering::SeqCst) == 0 {
            return Response::bytes(503, b"busy".to_vec());
        }
        serve_range(req, &b)
    }))
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("a.part");
    std::fs::write(&part, vec![0u8; 5000]).unwrap();
    let url = format!("{}/a", server.base);
    let e = download(&reqwest::Client::new(), &url, &part, 3000, None)
        .await
        .unwrap_err();
    assert!(matches!(&e, DownloadError::Transient(m) if m.contains("503")), "{e:?}");
    download(&reqwest::Client::new(), &url, &part, 3000, None)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), *body);
}

#[tokio::test]
async fn the_rate_limit_slows_the_transfer() {
    let body = Arc::new(data(60_000));
    let b = body.clone();
    let server = Server::start(Arc::new(move |req: &Request| serve_range(req, &b))).await;
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("a.part");
    let t0 = Instant::now();
    download(
        &reqwest::Client::new(),
        &format!("{}/a", server.base),
        &part,
        body.len() as u64,
        Some(100_000),
    )
    .await
    .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(450), "{:?}", t0.elapsed());
    assert_eq!(std::fs::read(&part).unwrap(), *body);
}
