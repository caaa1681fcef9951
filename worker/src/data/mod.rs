//! Everything between files on disk and the image / token batches a worker trains on.
//!
//! [`tokenizer`] (the CLIP BPE tokenizer) and [`preprocess`] (open_clip's image transforms) give
//! the same ids and pixels as open_clip 3.3.0; [`sampler`] and [`loader`] split and prefetch
//! batches per rank; [`synthetic`] is the built-in captioning set.
//!
//! Data sets on disk: [`train_set`] turns `--task_name` into one of [`coco_karpathy`] (COCO
//! Karpathy-format JSON), [`laion`] (LAION part files) or [`webdataset`] (`.tar` shards), with
//! [`parts`] locating shard files and splitting them across ranks; [`image_folder`] is the
//! zero-shot classification set; [`image_inputs`] expands the files, folders and lists that
//! `embed` and `caption` read.

pub mod coco_karpathy;
pub mod image_folder;
pub mod image_inputs;
pub mod laion;
pub mod loader;
pub mod parts;
pub mod preprocess;
pub mod sampler;
pub mod synthetic;
pub mod synthetic_source;
pub mod tokenizer;
pub mod train_set;
pub mod webdataset;
