//! The console's stylesheet and script, compiled into the binary so the
//! console needs nothing from the internet (no CDN, no web fonts) and no
//! npm step to build.

use http::StatusCode;

use crate::admin::AdminBody;

const STYLESHEET: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");

/// `GET /console/assets/NAME`.
pub fn serve(name: &str) -> http::Response<AdminBody> {
    match name {
        "console.css" => super::response(StatusCode::OK, "text/css; charset=utf-8", STYLESHEET),
        "console.js" => super::response(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
        _ => super::response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "no such console asset\n",
        ),
    }
}
