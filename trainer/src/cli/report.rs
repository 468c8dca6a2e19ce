use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use modkit_trainer::report;

pub use modkit_trainer::report::write_ucr_table;

/// Tables and plots of training runs: loss and mean test accuracy per epoch,
/// per-task accuracy side by side, the Update Compliance Ratio between tasks
/// (`modtrain train --ucr-every N`) as a table and a heatmap, and how far apart
/// the tasks' learned vectors are (mean and variance of |w_i − w_j|).
///
/// Prints the tables (Markdown) and writes report.md, loss.png, accuracy.png, and
/// for runs that measured UCR ucr.png (mean per epoch) and ucr-NAME.png (the last
/// epoch's heatmap), into --out.
///
/// Example: modtrain report runs/ (every run `modtrain train -o runs/NAME.safetensors` wrote)
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Runs: checkpoints (NAME.safetensors), their logs (NAME.metrics.jsonl), or
    /// directories holding logs.
    #[arg(required = true, value_name = "RUN")]
    runs: Vec<PathBuf>,
    /// Directory for report.md and the plots [default: RUN/report for one
    /// directory, else OUT.report beside the first run].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

impl ReportArgs {
    pub fn run(self) -> Result<()> {
        let report::Runs { runs, skipped } = report::load_runs(&self.runs)?;
        let out = match (&self.out, self.runs.as_slice()) {
            (Some(o), _) => o.clone(),
            (None, [dir]) if dir.is_dir() => dir.join("report"),
            (None, _) => {
                let log = runs[0].path.to_string_lossy().into_owned();
                let stem = log.strip_suffix(report::METRICS_SUFFIX).unwrap_or(&log);
                PathBuf::from(format!("{stem}report"))
            }
        };
        if out.is_file() {
            anyhow::bail!(
                "{} is a file; the report is a folder (report.md and the plots): {}",
                out.display(),
                match self.out {
                    Some(_) => "name a folder with -o",
                    None => "name a folder for it with -o DIR",
                }
            );
        }
        for note in skipped
            .iter()
            .map(String::as_str)
            .chain(runs.iter().filter_map(|r| r.note.as_deref()))
        {
            eprintln!("modtrain: warning: {note}");
        }
        // Before the tables: a refused folder prints nothing.
        report::check_report_dir(&out)?;
        report::write_summary(&mut std::io::stdout().lock(), &runs)?;
        for path in report::write_report(&runs, &out)? {
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}
