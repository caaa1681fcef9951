//! Which weights `--model` and `--pretrained` (or `--from_scratch`) choose, fetched when they
//! are released weights: shared by training and the inference commands.
//!
//! | `--model` | `--pretrained` | weights |
//! | --- | --- | --- |
//! | `paddlemix/CoCa/<name>` | absent or `True` | PaddleMIX's release ([`super::paddlemix`]) |
//! | a built-in open_clip config | a tag (`laion2b_s13b_b90k`, ...) | open_clip's release ([`super::hf`]) |
//! | anything | `FILE` | that checkpoint |
//! | a directory | `True` (inference: also absent) | the weight file in it |
//! | anything | `False`, or `--from_scratch` | random (seeded) initialisation |
//! | a built-in config | absent (training) | random initialisation |

use super::{hf, paddlemix, Hub};
use crate::cli::parse_bool;
use crate::hub::source::{resolve_config_in, WEIGHT_FILES};
use crate::model::CocaConfig;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The starting weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// Initialised from the seed.
    Random,
    /// A checkpoint, with a phrase saying where it came from (for the start-up log).
    File {
        /// The file.
        path: PathBuf,
        /// E.g. "PaddleMIX release paddlemix/CoCa/... (PATH)".
        origin: String,
    },
}

impl Weights {
    /// One phrase for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Weights::Random => "random initialisation (from --seed)".to_string(),
            Weights::File { origin, .. } => origin.clone(),
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `--model`.
    pub model: &'a str,
    /// `--pretrained`.
    pub pretrained: Option<&'a str>,
    /// `--from_scratch`.
    pub from_scratch: bool,
    /// Whether a `--model` directory's weights load without `--pretrained True` (the
    /// inference commands: yes; training: no, as before).
    pub dir_weights_by_default: bool,
}

fn dir_weights(model: &str, dir: &Path) -> Result<PathBuf> {
    WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "--model {model}: none of {} in {}; pass --pretrained FILE",
                WEIGHT_FILES.join(", "),
                dir.display()
            )
        })
}

/// Resolves the config and the weights (downloading released weights when needed).
pub fn resolve(req: Request<'_>, hub: &Hub) -> Result<(CocaConfig, Weights)> {
    let model = req.model;
    let (config, dir) = resolve_config_in(model, &hub.env)?;
    let release = paddlemix::release(model)?;
    // The same spellings as every boolean flag.
    let flag = req.pretrained.and_then(|v| parse_bool(v).ok());
    if req.from_scratch {
        if let (Some(v), None | Some(true)) = (req.pretrained, flag) {
            bail!("--from_scratch and --pretrained {v} contradict each other: pass one");
        }
        return Ok((config, Weights::Random));
    }
    let file = |path: PathBuf, what: String| Weights::File {
        origin: format!("{what} ({})", path.display()),
        path,
    };
    // Without --pretrained, weights are looked for only in a --model directory, never beside a
    // config file.
    let by_default = req.dir_weights_by_default && Path::new(model).is_dir();
    let weights =
        match (req.pretrained, flag) {
            (Some(_), Some(false)) => Weights::Random,
            (_, Some(true)) | (None, _) => {
                if let Some(r) = &release {
                    let path = r.weights(hub)?;
                    file(path, format!("PaddleMIX release {model}"))
                } else if let Some(dir) = dir.filter(|_| req.pretrained.is_some() || by_default) {
                    let path = dir_weights(model, &dir)?;
                    file(path, format!("the --model directory {}", dir.display()))
                } else if req.pretrained.is_some() {
                    let tags = hf::tags_of(model);
                    bail!(
                    "--pretrained True: --model {model} names no weights (no PaddleMIX release, \
                     no directory){}; pass --pretrained FILE",
                    if tags.is_empty() {
                        String::new()
                    } else {
                        format!(", but open_clip released it as --pretrained {}", tags.join(" or "))
                    }
                );
                } else {
                    Weights::Random
                }
            }
            (Some(v), None) => {
                let path = Path::new(v);
                let config_name = release.as_ref().map(|r| r.config).unwrap_or(model);
                if path.is_file() {
                    file(path.to_path_buf(), "--pretrained".to_string())
                } else if let Some(repo) = hf::tag_repo(config_name, v) {
                    let path = hf::weights(hub, repo, "main", hf::WEIGHT_FILES)?;
                    file(
                        path,
                        format!("open_clip release {config_name} {v} (Hugging Face {repo})"),
                    )
                } else {
                    let tags = hf::tags_of(config_name);
                    bail!(
                    "--pretrained {v}: no such file, and not a pretrained tag of --model {model}{}",
                    if tags.is_empty() {
                        String::new()
                    } else {
                        format!(" (its tags: {})", tags.join(", "))
                    }
                );
                }
            }
        };
    Ok((config, weights))
}
