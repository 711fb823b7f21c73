//! Charts drawn on the server as SVG: horizontal stacked bars with a legend. Labels are
//! escaped; the output needs no script and no external file.

/// One bar: a label and its segments (value, CSS colour, legend name).
pub struct Bar {
    pub label: String,
    pub segments: Vec<(u64, &'static str, String)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Stacked horizontal bars, each scaled to its own total (100% wide).
pub fn stacked_bars(title: &str, bars: &[Bar]) -> String {
    let (label_w, bar_w, row_h) = (140.0, 480.0, 28.0);
    let legend: Vec<(&str, &str)> = {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (_, color, name) in bars.iter().flat_map(|b| b.segments.iter()) {
            if !seen.iter().any(|(n, _)| n == name) {
                seen.push((name.as_str(), color));
            }
        }
        seen
    };
    let height = 30.0 + row_h * bars.len() as f64 + 30.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" role=\"img\" viewBox=\"0 0 {w} {height}\" width=\"{w}\" height=\"{height}\"><title>{t}</title>",
        w = label_w + bar_w + 80.0,
        t = escape(title)
    );
    out.push_str(&format!(
        "<text x=\"0\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        escape(title)
    ));
    for (i, bar) in bars.iter().enumerate() {
        let y = 26.0 + row_h * i as f64;
        let total: u64 = bar.segments.iter().map(|s| s.0).sum();
        out.push_str(&format!(
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text>",
            y + 16.0,
            escape(&bar.label)
        ));
        out.push_str(&format!(
            "<rect x=\"{label_w}\" y=\"{y}\" width=\"{bar_w}\" height=\"{}\" fill=\"#eef1f5\"/>",
            row_h - 8.0
        ));
        let mut x = label_w;
        for (value, color, name) in &bar.segments {
            if *value == 0 || total == 0 {
                continue;
            }
            let w = bar_w * *value as f64 / total as f64;
            out.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"><title>{}: {value}</title></rect>",
                row_h - 8.0,
                escape(name)
            ));
            x += w;
        }
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"12\">{total}</text>",
            label_w + bar_w + 8.0,
            y + 16.0
        ));
    }
    let mut x = 0.0;
    let y = 30.0 + row_h * bars.len() as f64;
    for (name, color) in legend {
        out.push_str(&format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\">{}</text>",
            x + 14.0,
            y + 9.0,
            escape(name)
        ));
        x += 24.0 + 7.0 * name.len() as f64;
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_and_escape() {
        let svg = stacked_bars(
            "a<b",
            &[Bar {
                label: "stage \"1\"".into(),
                segments: vec![
                    (3, "#2a2", "succeeded".into()),
                    (1, "#c33", "rolled back".into()),
                ],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("a&lt;b") && svg.contains("stage &quot;1&quot;"));
        assert!(svg.contains("width=\"360.0\""), "3 of 4 of 480 px: {svg}");
        assert!(svg.contains("<title>rolled back: 1</title>"));
    }
}
