//! Small image data sets the tests write: BMP files and an ImageFolder of coloured squares.

use std::path::Path;

/// A 24-bit BMP of `w`×`h` pixels from `pixel(x, y)`.
pub fn write_bmp(path: &Path, w: u32, h: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) {
    let row = (w * 3).div_ceil(4) * 4;
    let size = 54 + row * h;
    let mut b = Vec::with_capacity(size as usize);
    b.extend(b"BM");
    b.extend(size.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(54u32.to_le_bytes());
    b.extend(40u32.to_le_bytes());
    b.extend((w as i32).to_le_bytes());
    b.extend((h as i32).to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(24u16.to_le_bytes());
    b.extend([0u8; 24]);
    for y in (0..h).rev() {
        let start = b.len();
        for x in 0..w {
            let [r, g, bl] = pixel(x, y);
            b.extend([bl, g, r]);
        }
        b.resize(start + row as usize, 0);
    }
    std::fs::write(path, b).unwrap();
}

pub const CLASSES: [(&str, [u8; 3]); 4] = [
    ("blue", [20, 40, 230]),
    ("green", [30, 200, 40]),
    ("red", [220, 30, 30]),
    ("white", [245, 245, 245]),
];

pub fn write_folder(dir: &Path) {
    for (name, colour) in CLASSES {
        let class_dir = dir.join("images").join(name);
        std::fs::create_dir_all(&class_dir).unwrap();
        for (i, shade) in [0i32, -25, 25].into_iter().enumerate() {
            let c = colour.map(|v| (v as i32 + shade).clamp(0, 255) as u8);
            write_bmp(&class_dir.join(format!("{i}.bmp")), 40, 30, |x, y| {
                if (x / 8 + y / 8) % 3 == 0 {
                    [c[0] / 2, c[1] / 2, c[2] / 2]
                } else {
                    c
                }
            });
        }
    }
    let labels: Vec<String> = CLASSES.iter().map(|(n, _)| format!("{n} square")).collect();
    std::fs::write(dir.join("labels.txt"), labels.join("\n")).unwrap();
    std::fs::write(
        dir.join("templates.txt"),
        "a photo of a {}.\na drawing of a {}.\n",
    )
    .unwrap();
}
