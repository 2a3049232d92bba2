// Render the math that pymdownx.arithmatex (generic mode) leaves as \( … \) and \[ … \]
// inside .arithmatex elements. KaTeX is served from this site: no network needed.
// Material's document$ fires on every page load, including instant navigation.
function renderMath() {
  document.querySelectorAll(".arithmatex").forEach(function (element) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: true,
    });
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(renderMath);
} else {
  document.addEventListener("DOMContentLoaded", renderMath);
}
