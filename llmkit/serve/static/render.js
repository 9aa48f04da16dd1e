// Markdown to safe HTML (marked, then DOMPurify), code highlighted by highlight.js, and the copy
// buttons. The three libraries are vendored under /static/vendor as globals.
/* global marked, DOMPurify, hljs */

hljs.configure({ ignoreUnescapedHTML: true });

export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // plain http on another host is not a secure context: the old way still works there
  const area = document.createElement("textarea");
  area.value = text;
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

export function copyButton(className, getText) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy " + className;
  button.textContent = "Copy";
  button.title = "Copy to the clipboard";
  button.addEventListener("click", async () => {
    try {
      await copyText(getText());
      button.textContent = "Copied";
    } catch (e) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true }));
  for (const code of element.querySelectorAll("pre > code")) {
    hljs.highlightElement(code);
    code.parentElement.classList.add("code-block");
    code.parentElement.appendChild(copyButton("copy-code", () => code.textContent));
  }
}
