//! Tests of `synthetic`.

use super::*;
use std::collections::HashSet;

/// Whether each pixel is closer to the shapes' palette colour than to the background's.
fn foreground_mask(sample: &SyntheticSample) -> Vec<bool> {
    let fg = PALETTE[sample.attributes.colour];
    let bg = PALETTE[sample.attributes.background];
    let distance = |p: &[u8], c: [u8; 3]| -> i32 {
        (0..3)
            .map(|k| (i32::from(p[k]) - i32::from(c[k])).pow(2))
            .sum()
    };
    sample
        .image
        .pixels()
        .map(|p| distance(&p.0, fg) < distance(&p.0, bg))
        .collect()
}

/// 8-connected components of the mask: their sizes and centroids (in pixels).
fn components(mask: &[bool], n: usize) -> Vec<(usize, f64, f64)> {
    let mut seen = vec![false; mask.len()];
    let mut found = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let (mut count, mut sx, mut sy) = (0usize, 0.0, 0.0);
        while let Some(at) = stack.pop() {
            let (x, y) = ((at % n) as i64, (at / n) as i64);
            count += 1;
            sx += x as f64 + 0.5;
            sy += y as f64 + 0.5;
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= n as i64 || ny >= n as i64 {
                        continue;
                    }
                    let next = ny as usize * n + nx as usize;
                    if mask[next] && !seen[next] {
                        seen[next] = true;
                        stack.push(next);
                    }
                }
            }
        }
        found.push((count, sx / count as f64, sy / count as f64));
    }
    found
}

#[test]
fn same_seed_and_index_give_the_same_sample() {
    let a = SyntheticCaptions::new(7, 100, 64);
    let b = SyntheticCaptions::new(7, 100, 64);
    for index in [0, 1, 2, 99, 12_345, u64::MAX] {
        let (x, y) = (a.get(index), b.get(index));
        assert_eq!(x, y, "index {index}");
        assert_eq!(x.attributes, a.attributes(index));
    }
}

#[test]
fn different_seeds_and_indices_differ() {
    let a = SyntheticCaptions::new(1, 100, 64);
    let b = SyntheticCaptions::new(2, 100, 64);
    let same_seed = (0..50)
        .filter(|&i| a.get(i).image == b.get(i).image)
        .count();
    assert_eq!(same_seed, 0);
    let same_caption = (0..50)
        .filter(|&i| a.get(i).caption == b.get(i).caption)
        .count();
    assert!(same_caption < 5, "{same_caption} of 50 captions equal");
    let images: HashSet<Vec<u8>> = (0..200).map(|i| a.get(i).image.into_raw()).collect();
    assert_eq!(images.len(), 200);
}

#[test]
fn held_out_split_draws_other_pictures() {
    let train = SyntheticCaptions::new(3, 1000, 64);
    let eval = train.held_out(100);
    assert_eq!(eval.len(), 100);
    assert_eq!(eval.seed(), 3 ^ HELD_OUT_SALT);
    assert_eq!(eval.image_size(), 64);
    assert_eq!(eval.held_out(1000), train);
    let train_images: HashSet<Vec<u8>> = (0..1000).map(|i| train.get(i).image.into_raw()).collect();
    assert!((0..100).all(|i| !train_images.contains(eval.get(i).image.as_raw())));
}

#[test]
fn captions_match_attributes() {
    let set = SyntheticCaptions::new(11, 0, 32);
    assert!(set.is_empty());
    for index in 0..3000 {
        let a = set.attributes(index);
        assert_ne!(a.colour, a.background);
        assert!((1..=4).contains(&a.count));
        let caption = a.caption();
        let words: Vec<&str> = caption.split(' ').collect();
        assert_eq!(words[0], COUNTS[a.count - 1], "{caption}");
        assert_eq!(words[1], COLOURS[a.colour], "{caption}");
        let plural = format!("{}s", SHAPES[a.shape]);
        let shape = if a.count == 1 {
            SHAPES[a.shape]
        } else {
            &plural
        };
        assert_eq!(words[2], shape, "{caption}");
        assert!(caption.ends_with(&format!(" {} background", COLOURS[a.background])));
        assert_eq!(caption.contains(" on the left "), a.position == 1);
        assert_eq!(caption.contains(" in the middle "), a.position == 5);
        let rest = &caption[words[..3].join(" ").len()..];
        let expected_rest = if a.position == 0 {
            String::new()
        } else {
            format!(" {}", POSITIONS[a.position])
        };
        assert!(
            rest.starts_with(&format!("{expected_rest} on a")),
            "{caption}"
        );
    }
    let orange = SyntheticAttributes {
        shape: 1,
        colour: 2,
        count: 1,
        position: 3,
        background: 1,
    };
    assert_eq!(
        orange.caption(),
        "one yellow square at the top on an orange background"
    );
}

#[test]
fn grammar_has_over_ten_thousand_reachable_captions() {
    let total = SyntheticCaptions::distinct_captions();
    assert!(total >= 10_000);
    let all: HashSet<String> = (0..total)
        .map(|k| SyntheticAttributes::from_combination(k).caption())
        .collect();
    assert_eq!(all.len(), total);
    let set = SyntheticCaptions::new(5, 0, 64);
    let drawn: HashSet<String> = (0..50_000).map(|i| set.attributes(i).caption()).collect();
    assert!(drawn.is_subset(&all));
    // uniform draws reach 1 - e^(-50000/10800) ≈ 99% of the grammar
    assert!(
        drawn.len() * 100 >= total * 97,
        "{} of {total}",
        drawn.len()
    );
}

#[test]
fn class_indices_name_the_colour_and_shape() {
    let names = SyntheticCaptions::class_names();
    assert_eq!(names.len(), COLOURS.len() * SHAPES.len());
    assert_eq!(names.iter().collect::<HashSet<_>>().len(), names.len());
    let set = SyntheticCaptions::new(9, 0, 32);
    for index in 0..500 {
        let sample = set.get(index);
        let a = sample.attributes;
        assert!(sample.class_index < names.len());
        assert_eq!(
            names[sample.class_index],
            format!("{} {}", COLOURS[a.colour], SHAPES[a.shape])
        );
        assert!(sample.caption.contains(&names[sample.class_index]));
    }
    let templates = SyntheticCaptions::templates();
    assert!(templates.len() >= 2);
    assert!(templates.iter().all(|t| t.matches("{}").count() == 1));
}

#[test]
fn palette_colours_are_well_separated() {
    for i in 0..PALETTE.len() {
        for j in 0..i {
            let d: i32 = (0..3)
                .map(|k| (i32::from(PALETTE[i][k]) - i32::from(PALETTE[j][k])).pow(2))
                .sum();
            assert!(d >= 80 * 80, "{} and {} too close", COLOURS[i], COLOURS[j]);
        }
    }
}

/// Counts objects by connected components and checks where the group is.
fn check_pixels(size: u32, samples: u64) {
    let set = SyntheticCaptions::new(21, 0, size);
    let n = size as usize;
    for index in 0..samples {
        let sample = set.get(index);
        assert_eq!(sample.image.dimensions(), (size, size));
        let found = components(&foreground_mask(&sample), n);
        let a = sample.attributes;
        assert_eq!(
            found.len(),
            a.count,
            "{size}px #{index}: {}",
            sample.caption
        );
        let smallest = found.iter().map(|c| c.0).min().unwrap();
        assert!(
            smallest * 64 >= n * n / 16,
            "{size}px #{index}: object of {smallest} px"
        );
        let (cx, cy) = mean(&found.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>());
        let (cx, cy) = (cx / n as f64, cy / n as f64);
        let right_place = match a.position {
            1 => cx < 0.4 && (0.3..0.7).contains(&cy),
            2 => cx > 0.6 && (0.3..0.7).contains(&cy),
            3 => cy < 0.4 && (0.3..0.7).contains(&cx),
            4 => cy > 0.6 && (0.3..0.7).contains(&cx),
            5 => (0.35..0.65).contains(&cx) && (0.35..0.65).contains(&cy),
            _ => true,
        };
        assert!(
            right_place,
            "{size}px #{index}: {} at ({cx:.2}, {cy:.2})",
            sample.caption
        );
    }
}

#[test]
fn objects_are_countable_and_placed_at_64() {
    check_pixels(64, 500);
}

#[test]
fn objects_are_countable_and_placed_at_32_and_224() {
    check_pixels(32, 300);
    check_pixels(224, 40);
}

#[test]
fn layout_and_caption_do_not_depend_on_size() {
    let small = SyntheticCaptions::new(4, 0, 32);
    let large = SyntheticCaptions::new(4, 0, 224);
    for index in 0..20 {
        let (s, l) = (small.get(index), large.get(index));
        assert_eq!(s.caption, l.caption);
        assert_eq!(l.image.dimensions(), (224, 224));
    }
    // tiny and odd sizes draw without panicking
    for size in [0, 1, 7, 33, 100] {
        let set = SyntheticCaptions::new(4, 0, size);
        assert_eq!(set.get(3).image.dimensions(), (size, size));
    }
}

#[test]
fn every_combination_places_its_objects() {
    // every (count, position) pair under many seeds, directly on the layout
    let set = SyntheticCaptions::new(0, 0, 64);
    for k in 0..2000u64 {
        let mut rng = set.rng(k);
        for count in 1..=4 {
            for position in 0..POSITIONS.len() {
                let a = SyntheticAttributes {
                    shape: 0,
                    colour: 0,
                    count,
                    position,
                    background: 1,
                };
                let layout = Layout::place(&a, &mut rng);
                assert_eq!(layout.centres.len(), count);
                // at least 3.5 pixels at 32×32 (4 objects in half the canvas, shrunk twice)
                assert!(layout.side * 32.0 >= 3.5, "side {}", layout.side);
                let (area, _) = region(position);
                let half = layout.side / 2.0;
                for (i, c) in layout.centres.iter().enumerate() {
                    assert!(c.0 - half >= area.x0 - 1e-9 && c.0 + half <= area.x1 + 1e-9);
                    assert!(c.1 - half >= area.y0 - 1e-9 && c.1 + half <= area.y1 + 1e-9);
                    for o in &layout.centres[..i] {
                        let apart = (o.0 - c.0).abs() >= layout.side + GAP - 1e-9
                            || (o.1 - c.1).abs() >= layout.side + GAP - 1e-9;
                        assert!(apart, "overlap: count {count} position {position}");
                    }
                }
            }
        }
    }
}
