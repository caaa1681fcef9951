//! Downloads against a loopback server this test starts (`test_server`): complete files,
//! resume after a dropped connection, rename only when complete, size and checksum errors,
//! offline mode, mirrors, one downloader per node over a real control plane, the COCO archive,
//! and the PaddleMIX and Hugging Face cache layouts.

use super::coco::{ensure_karpathy, Archive};
use super::download::part_path;
use super::hf;
use super::paddlemix::{release, RELEASES};
use super::test_server::{Route, TestServer};
use super::weights::{resolve, Request, Weights};
use super::*;
use crate::hub::checksum::Checksum;
use anyhow::Result;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes that differ at every position (a misplaced resume shows).
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn routes(list: Vec<(&str, Route)>) -> HashMap<String, Route> {
    list.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Settings with every cache under `root`, every base URL at `base`, online unless `offline`.
fn env_at(root: &Path, base: &str, offline: bool) -> HubEnv {
    HubEnv {
        offline,
        ppmix_home: root.join("paddlemix"),
        hf_cache: root.join("hf"),
        hf_endpoint: base.to_string(),
        paddlemix_models_url: base.to_string(),
        paddlemix_data_url: base.to_string(),
    }
}

fn quick(env: &HubEnv) -> Downloader {
    Downloader::new(env).with_retries(3, Duration::from_millis(10))
}

fn hub_at(root: &Path, base: &str, offline: bool) -> Hub {
    let env = env_at(root, base, offline);
    let dl = quick(&env);
    Hub::new(env, NodeGate::alone()).with_downloader(dl)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_download_is_complete_renamed_and_not_repeated() {
    let body = payload(2_500_000);
    let server = TestServer::start(routes(vec![("GET /w.bin", Route::file(&body))]));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("sub/w.bin");
    let dl = quick(&env_at(dir.path(), "", false));
    assert!(dl
        .fetch(&server.url("/w.bin"), &dest, &Expected::default())
        .unwrap());
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert!(!part_path(&dest).exists());
    assert!(!dl
        .fetch(&server.url("/w.bin"), &dest, &Expected::default())
        .unwrap());
    assert_eq!(server.count("GET", "/w.bin"), 1);
}

#[test]
fn a_dropped_connection_is_resumed_with_a_range_request() {
    let body = payload(3_000_000);
    let route = Route {
        drops: 1,
        cut_at: 1_200_000,
        ..Route::file(&body)
    };
    let server = TestServer::start(routes(vec![("GET /w.bin", route)]));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("w.bin");
    let sha = sha256_hex(&body);
    let expected = Expected {
        size: Some(body.len() as u64),
        checksum: Some(Checksum::Sha256(sha)),
    };
    quick(&env_at(dir.path(), "", false))
        .fetch(&server.url("/w.bin"), &dest, &expected)
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert_eq!(
        server.requests(),
        vec!["GET /w.bin -", "GET /w.bin bytes=1200000-"]
    );
}

#[test]
fn an_unfinished_download_is_never_renamed_and_resumes_on_the_next_run() {
    let body = payload(1_000_000);
    let route = Route {
        drops: 4,
        cut_at: 100_000,
        ..Route::file(&body)
    };
    let server = TestServer::start(routes(vec![("GET /w.bin", route)]));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("w.bin");
    let dl = quick(&env_at(dir.path(), "", false)).with_retries(2, Duration::from_millis(5));
    let err = format!(
        "{:#}",
        dl.fetch(&server.url("/w.bin"), &dest, &Expected::default())
            .unwrap_err()
    );
    assert!(!dest.exists());
    assert_eq!(std::fs::metadata(part_path(&dest)).unwrap().len(), 300_000);
    assert!(err.contains(&server.url("/w.bin")), "{err}");
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    // The fourth drop, then the rest: completes from byte 400,000.
    dl.fetch(&server.url("/w.bin"), &dest, &Expected::default())
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert_eq!(server.count("GET", "/w.bin"), 5);
    assert!(server.requests()[4].ends_with("bytes=400000-"));
}

#[test]
fn a_wrong_size_is_an_error_and_leaves_nothing() {
    let body = payload(50_000);
    let server = TestServer::start(routes(vec![("GET /w.bin", Route::file(&body))]));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("w.bin");
    let expected = Expected {
        size: Some(60_000),
        checksum: None,
    };
    let err = format!(
        "{:#}",
        quick(&env_at(dir.path(), "", false))
            .fetch(&server.url("/w.bin"), &dest, &expected)
            .unwrap_err()
    );
    assert!(err.contains("wrong size") && err.contains("60000"), "{err}");
    assert!(!dest.exists());
}

#[test]
fn a_checksum_mismatch_from_the_server_or_the_caller_is_an_error() {
    let body = payload(40_000);
    let right = sha256_hex(&body);
    let wrong = sha256_hex(b"something else");
    let server = TestServer::start(routes(vec![
        (
            "GET /bad.bin",
            Route::file(&body).header("ETag", &format!("\"{wrong}\"")),
        ),
        (
            "GET /good.bin",
            Route::file(&body).header("X-Linked-Etag", &format!("\"{right}\"")),
        ),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let dl = quick(&env_at(dir.path(), "", false));
    let bad = dir.path().join("bad.bin");
    let err = format!(
        "{:#}",
        dl.fetch(&server.url("/bad.bin"), &bad, &Expected::default())
            .unwrap_err()
    );
    assert!(
        err.contains("checksum mismatch") && err.contains(&wrong),
        "{err}"
    );
    assert!(!bad.exists() && !part_path(&bad).exists());
    let good = dir.path().join("good.bin");
    dl.fetch(&server.url("/good.bin"), &good, &Expected::default())
        .unwrap();
    let md5 = dir.path().join("md5.bin");
    let expected = Expected {
        size: None,
        checksum: Some(Checksum::Md5("0".repeat(32))),
    };
    let err = format!(
        "{:#}",
        dl.fetch(&server.url("/good.bin"), &md5, &expected)
            .unwrap_err()
    );
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!md5.exists());
}

#[test]
fn offline_nothing_is_requested_and_the_error_says_where_the_file_goes() {
    let server = TestServer::start(routes(vec![("GET /w.bin", Route::file(b"x"))]));
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_at(dir.path(), &server.url(""), true);
    let r = release(&format!("paddlemix/CoCa/{}", RELEASES[0].0))
        .unwrap()
        .unwrap();
    let err = format!("{:#}", r.weights(&hub).unwrap_err());
    assert!(err.contains("offline"), "{err}");
    assert!(err.contains(&r.url(&hub)), "{err}");
    assert!(
        err.contains(&r.cache_dir_in(&hub.env).display().to_string()),
        "{err}"
    );
    let err = format!(
        "{:#}",
        hf::weights(&hub, "laion/x", "main", hf::WEIGHT_FILES).unwrap_err()
    );
    assert!(
        err.contains("laion/x") && err.contains("COCA_OFFLINE"),
        "{err}"
    );
    assert!(server.requests().is_empty());
}

#[test]
fn the_environment_sets_caches_mirrors_and_offline_mode() {
    let vars: HashMap<&str, &str> = [
        ("PPMIX_HOME", "/data/ppmix"),
        ("HF_HOME", "/data/hf"),
        ("HF_ENDPOINT", "https://mirror.example/hf/"),
        ("COCA_PADDLEMIX_BASE_URL", "http://127.0.0.1:9/models"),
        ("HF_HUB_OFFLINE", "1"),
    ]
    .into_iter()
    .collect();
    let env = HubEnv::from_vars(|n| vars.get(n).map(|v| v.to_string()));
    assert!(env.offline);
    assert_eq!(env.paddlemix_model_home(), Path::new("/data/ppmix/models"));
    assert_eq!(env.paddlemix_data_home(), Path::new("/data/ppmix/datasets"));
    assert_eq!(env.hf_cache, Path::new("/data/hf/hub"));
    assert_eq!(env.hf_endpoint, "https://mirror.example/hf");
    assert_eq!(env.paddlemix_models_url, "http://127.0.0.1:9/models");
    assert_eq!(env.paddlemix_data_url, env::PADDLEMIX_DATA_URL);
    let hub = Hub::new(env, NodeGate::alone());
    let r = release("paddlemix/CoCa/CoCa-ViT-L-14-laion2B-s13B-b90k")
        .unwrap()
        .unwrap();
    assert_eq!(
        r.url(&hub),
        "http://127.0.0.1:9/models/paddlemix/CoCa/CoCa-ViT-L-14-laion2B-s13B-b90k/model_state.pdparams"
    );
    assert_eq!(
        r.cache_dir_in(&hub.env),
        Path::new("/data/ppmix/models/paddlemix/CoCa/CoCa-ViT-L-14-laion2B-s13B-b90k")
    );
    let defaults = HubEnv::from_vars(|n| (n == "HF_HUB_CACHE").then(|| "/c".to_string()));
    assert!(!defaults.offline);
    assert_eq!(defaults.hf_cache, Path::new("/c"));
    assert_eq!(defaults.paddlemix_models_url, env::PADDLEMIX_MODELS_URL);
    assert_eq!(defaults.hf_endpoint, env::HF_ENDPOINT);
}

#[test]
fn a_release_downloads_from_the_mirror_into_paddlemix_s_cache() {
    let body = payload(10_000);
    let name = RELEASES[2].0;
    let path = format!("/mirror/paddlemix/CoCa/{name}/model_state.pdparams");
    let server = TestServer::start(routes(vec![(&format!("GET {path}"), Route::file(&body))]));
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_at(dir.path(), &server.url("/mirror"), false);
    let r = release(&format!("paddlemix/CoCa/{name}")).unwrap().unwrap();
    let got = r.weights(&hub).unwrap();
    assert_eq!(
        got,
        dir.path()
            .join("paddlemix/models/paddlemix/CoCa")
            .join(name)
            .join("model_state.pdparams")
    );
    assert_eq!(std::fs::read(&got).unwrap(), body);
    assert_eq!(server.count("GET", &path), 1);
    let err = release("paddlemix/CoCa/CoCa-ViT-H-14")
        .unwrap_err()
        .to_string();
    assert!(err.contains(RELEASES[3].0), "{err}");
}

/// A control plane on loopback and one client per rank.
fn control_plane(ranks: usize) -> (ControlServerGuard, Vec<std::sync::Arc<ControlClient>>) {
    let token = Token::from_secret("coca-hub-test-token-0123456789").unwrap();
    let server = ControlServer::start(ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        token: token.clone(),
        nnodes: 1,
        min_nnodes: 1,
        rdzv_timeout: Duration::from_secs(20),
        heartbeat_timeout: Duration::from_secs(10),
        max_restarts: 0,
        handshake: Default::default(),
    })
    .unwrap();
    let clients = (0..ranks)
        .map(|rank| {
            std::sync::Arc::new(
                ControlClient::connect(
                    ClientConfig {
                        server: server.local_addr(),
                        token: token.clone(),
                        connect_timeout: Duration::from_secs(5),
                        heartbeat_interval: Duration::from_millis(200),
                    },
                    Identity::Worker {
                        rank,
                        generation: 0,
                    },
                )
                .unwrap(),
            )
        })
        .collect();
    (ControlServerGuard(Some(server)), clients)
}

use coca_common::control::{
    ClientConfig, ControlClient, ControlServer, Identity, ServerConfig, Token,
};

/// Shuts the control plane down at the end of a test.
struct ControlServerGuard(Option<ControlServer>);

impl Drop for ControlServerGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.shutdown();
        }
    }
}

#[test]
fn one_rank_per_node_downloads_and_the_others_wait_for_it() {
    let body = payload(1_500_000);
    let name = RELEASES[0].0;
    let path = format!("/paddlemix/CoCa/{name}/model_state.pdparams");
    let missing = format!("paddlemix/CoCa/{}", RELEASES[1].0);
    let server = TestServer::start(routes(vec![(&format!("GET {path}"), Route::file(&body))]));
    let dir = tempfile::tempdir().unwrap();
    let env = env_at(dir.path(), &server.url(""), false);
    let (_control, clients) = control_plane(4);
    let results: Vec<(Result<PathBuf>, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(rank, client)| {
                let env = env.clone();
                let missing = missing.clone();
                s.spawn(move || {
                    // Ranks 0-3 on one node; local rank 0 downloads.
                    let gate = NodeGate::new(client.clone(), rank, 0, rank, 0);
                    let hub = Hub::new(env.clone(), gate).with_downloader(quick(&env));
                    let ok = release(&format!("paddlemix/CoCa/{name}"))
                        .unwrap()
                        .unwrap()
                        .weights(&hub);
                    // A release the server does not have: every rank gets the error.
                    let err = release(&missing).unwrap().unwrap().weights(&hub);
                    (ok, format!("{:#}", err.unwrap_err()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (ok, err)) in results.into_iter().enumerate() {
        assert_eq!(std::fs::read(ok.unwrap()).unwrap(), body);
        assert!(err.contains("HTTP 404"), "rank {rank}: {err}");
        if rank > 0 {
            assert!(err.contains("local rank 0 could not fetch"), "{err}");
        }
    }
    assert_eq!(server.count("GET", &path), 1, "{:?}", server.requests());
    assert_eq!(server.requests().len(), 2, "{:?}", server.requests());
}

/// A tar holding `coco/annotations/coco_karpathy_train.json` and one image.
fn tiny_coco_tar() -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let annotations = serde_json::json!([
        {"caption": "a red square", "image": "val2014/a.png", "image_id": "coco_1"},
        {"caption": "a red tile", "image": "val2014/a.png", "image_id": "coco_1"},
    ])
    .to_string();
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in [
        (
            "coco/annotations/coco_karpathy_train.json",
            annotations.as_bytes(),
        ),
        ("coco/images/val2014/a.png", png.as_slice()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn a_missing_coco_karpathy_set_is_downloaded_extracted_and_opened() {
    use crate::data::coco_karpathy::CocoCaptions;
    use crate::data::loader::CaptionSource;
    let tar = tiny_coco_tar();
    let md5 = format!("{:x}", md5::Md5::digest(&tar));
    let server = TestServer::start(routes(vec![("GET /coco.tar", Route::file(&tar))]));
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_at(dir.path(), &server.url(""), false);
    let root = hub.env.paddlemix_data_home().join("coco");
    let archive = Archive {
        url: server.url("/coco.tar"),
        md5: Some(md5),
    };
    ensure_karpathy(&root, &hub, &archive).unwrap();
    let set = CocoCaptions::karpathy_train(&root, 32, 0).unwrap();
    assert_eq!(set.len(), 2);
    assert!(root.join("images/val2014/a.png").is_file());
    assert!(!hub.env.paddlemix_data_home().join("coco.tar").exists());
    ensure_karpathy(&root, &hub, &archive).unwrap();
    assert_eq!(server.count("GET", "/coco.tar"), 1);
    // A data root not named coco is not downloaded into.
    let other = dir.path().join("elsewhere");
    let err = ensure_karpathy(&other, &hub, &archive)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("coco_karpathy_train.json") && err.contains("elsewhere"),
        "{err}"
    );
    assert_eq!(server.count("GET", "/coco.tar"), 1);
    // Offline, a missing set is an error naming the archive and its folder; no request.
    let offline = hub_at(&dir.path().join("fresh"), &server.url(""), true);
    let fresh = offline.env.paddlemix_data_home().join("coco");
    let err = format!(
        "{:#}",
        ensure_karpathy(&fresh, &offline, &archive).unwrap_err()
    );
    assert!(
        err.contains("offline") && err.contains(&archive.url),
        "{err}"
    );
    assert!(!fresh.exists());
    assert_eq!(server.count("GET", "/coco.tar"), 1);
    // The seed's archive URL follows the mirror.
    assert_eq!(Archive::seed(&hub).url, server.url("/coco.tar"));
}

fn fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/coca-tiny");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: {} is absent", dir.display());
        None
    }
}

#[test]
fn a_paddlemix_name_loads_its_weights_from_a_filled_cache_offline() {
    let Some(fixtures) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_at(dir.path(), "http://127.0.0.1:9", true);
    let name = format!("paddlemix/CoCa/{}", RELEASES[0].0);
    let cache = release(&name).unwrap().unwrap().cache_dir_in(&hub.env);
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::copy(fixtures.join("config.json"), cache.join("config.json")).unwrap();
    std::fs::copy(
        fixtures.join("paddle_model_state.pdparams"),
        cache.join("model_state.pdparams"),
    )
    .unwrap();
    let request = Request {
        model: &name,
        pretrained: None,
        from_scratch: false,
        dir_weights_by_default: false,
    };
    let (config, weights) = resolve(request, &hub).unwrap();
    let expected = crate::model::CocaConfig::from_file(&fixtures.join("config.json")).unwrap();
    assert_eq!(config, expected);
    let Weights::File { path, origin } = weights else {
        panic!("random weights for a release")
    };
    assert_eq!(path, cache.join("model_state.pdparams"));
    assert!(
        origin.contains("PaddleMIX release") && origin.contains(&name),
        "{origin}"
    );
    let tensors = crate::checkpoint::load_for_model(
        &path,
        &config,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(tensors.contains_key("logit_scale"));
    // --pretrained False and --from_scratch: random; both at once with a file: an error.
    for (pretrained, from_scratch) in [(Some("False"), false), (None, true)] {
        let r = Request {
            pretrained,
            from_scratch,
            ..request
        };
        assert_eq!(resolve(r, &hub).unwrap().1, Weights::Random);
    }
    let r = Request {
        pretrained: Some("True"),
        from_scratch: true,
        ..request
    };
    assert!(resolve(r, &hub)
        .unwrap_err()
        .to_string()
        .contains("--from_scratch"));
}

#[test]
fn open_clip_tags_resolve_through_the_hugging_face_cache_layout() {
    let dir = tempfile::tempdir().unwrap();
    let body = payload(30_000);
    let sha = sha256_hex(&body);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = "laion/CoCa-ViT-B-32-laion2B-s13B-b90k";
    let resolve_path = format!("/{repo}/resolve/main");
    let server = TestServer::start(routes(vec![
        (
            &format!("HEAD {resolve_path}/open_clip_pytorch_model.bin"),
            Route {
                status: Some(302),
                ..Route::default()
            }
            .header("Location", &format!("/cdn/{sha}"))
            .header("X-Repo-Commit", commit)
            .header("X-Linked-Etag", &format!("\"{sha}\""))
            .header("X-Linked-Size", &body.len().to_string()),
        ),
        (&format!("GET /cdn/{sha}"), Route::file(&body)),
    ]));
    let hub = hub_at(dir.path(), &server.url(""), false);
    let request = Request {
        model: "coca_ViT-B-32",
        pretrained: Some("laion2b_s13b_b90k"),
        from_scratch: false,
        dir_weights_by_default: false,
    };
    let (_, weights) = resolve(request, &hub).unwrap();
    let Weights::File { path, origin } = weights else {
        panic!("no file")
    };
    let repo_dir = dir
        .path()
        .join("hf/models--laion--CoCa-ViT-B-32-laion2B-s13B-b90k");
    assert_eq!(
        path,
        repo_dir
            .join("snapshots")
            .join(commit)
            .join("open_clip_pytorch_model.bin")
    );
    assert!(origin.contains(repo), "{origin}");
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(repo_dir.join("blobs").join(&sha)).unwrap(),
        body
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    // The safetensors file was asked for first and is absent.
    assert_eq!(
        server.count(
            "HEAD",
            &format!("{resolve_path}/open_clip_model.safetensors")
        ),
        1
    );
    // Now cached: found offline, nothing requested.
    let before = server.requests().len();
    let offline = hub_at(dir.path(), &server.url(""), true);
    let (_, again) = resolve(request, &offline).unwrap();
    assert!(matches!(again, Weights::File { path: p, .. } if p == path));
    assert_eq!(server.requests().len(), before);
    // Unknown tags are named.
    let r = Request {
        pretrained: Some("laion400m"),
        ..request
    };
    let err = resolve(r, &offline).unwrap_err().to_string();
    assert!(err.contains("mscoco_finetuned_laion2b_s13b_b90k"), "{err}");
}
