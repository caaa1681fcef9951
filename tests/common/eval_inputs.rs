//! The inputs of an evaluation of every kind on the `coca-tiny` fixture: a colour ImageFolder,
//! and a three-image split for retrieval and captioning.

use std::path::Path;

/// Paths (as strings, for flags) of the evaluation inputs written by [`write`].
pub struct EvalInputs {
    pub model: String,
    pub folder: String,
    pub split: String,
    pub images: String,
}

/// Writes the inputs into `tmp` for the model in `fixture`.
pub fn write(tmp: &Path, fixture: &Path) -> EvalInputs {
    let folder = tmp.join("colours");
    super::images::write_folder(&folder);
    let images = tmp.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let names = ["astronaut.png", "chelsea.jpg", "coffee_rgba.png"];
    for n in names {
        std::fs::copy(fixture.join("images").join(n), images.join(n)).unwrap();
    }
    let records: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| serde_json::json!({"image": n, "caption": [format!("photo {i}"), "a thing"]}))
        .collect();
    let split = tmp.join("split.json");
    std::fs::write(&split, serde_json::to_string(&records).unwrap()).unwrap();
    EvalInputs {
        model: fixture.display().to_string(),
        folder: folder.display().to_string(),
        split: split.display().to_string(),
        images: images.display().to_string(),
    }
}

impl EvalInputs {
    /// `eval` with zero-shot classification, retrieval and captioning (8 tokens) at batch 2.
    pub fn eval_all(&self) -> Vec<&str> {
        vec![
            "eval",
            "--model",
            &self.model,
            "--classification_eval",
            &self.folder,
            "--no_classifier_cache",
            "--retrieval",
            &self.split,
            "--captioning",
            &self.split,
            "--data_root",
            &self.images,
            "--seq_len",
            "8",
            "--batch_size",
            "2",
        ]
    }
}
