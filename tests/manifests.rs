//! Models built from the built-in configs have exactly the released models' tensors.

mod common;

use coca_worker::model::manifest::{parameter_count, parameter_shapes};
use coca_worker::model::CocaConfig;

fn check(name: &str) {
    let Some(path) = common::fixture(&format!("manifests/{name}.json")) else {
        return;
    };
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let config = CocaConfig::named(name).unwrap();
    let expected_config: CocaConfig = serde_json::from_value(manifest["config"].clone()).unwrap();
    assert_eq!(
        config, expected_config,
        "built-in config differs from the manifest's"
    );
    let mut ours: Vec<(String, Vec<usize>)> = parameter_shapes(&config).unwrap();
    let mut theirs: Vec<(String, Vec<usize>)> = manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let shape = t[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize);
            (t[0].as_str().unwrap().to_string(), shape.collect())
        })
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    let count = parameter_count(&config).unwrap();
    assert_eq!(count as u64, manifest["param_count"].as_u64().unwrap());
}

#[test]
fn coca_vit_b_32_has_the_released_tensors() {
    check("coca_ViT-B-32");
}

#[test]
fn coca_vit_l_14_has_the_released_tensors() {
    check("coca_ViT-L-14");
}

#[test]
fn configs_we_cannot_honour_are_errors() {
    let base = CocaConfig::named("coca_ViT-B-32").unwrap();
    let mut json = serde_json::to_value(&base).unwrap();
    json["vision_cfg"]["ls_init_value"] = serde_json::json!(0.1);
    let err = CocaConfig::from_json(&json.to_string()).unwrap_err();
    assert!(format!("{err:#}").contains("ls_init_value"), "{err:#}");
    let mut json = serde_json::to_value(&base).unwrap();
    json["text_cfg"]["hf_model_name"] = serde_json::json!("bert");
    let err = CocaConfig::from_json(&json.to_string()).unwrap_err();
    assert!(format!("{err:#}").contains("hf_model_name"), "{err:#}");
    let err = CocaConfig::named("coca_ViT-H-14").unwrap_err();
    assert!(format!("{err:#}").contains("coca_ViT-B-32"), "{err:#}");
}
