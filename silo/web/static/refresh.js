// Auto-refresh for overview pages (body[data-refresh] = seconds). Off when the
// checkbox is cleared; the choice is remembered in this browser. Pages work without it.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  var box = document.getElementById("autorefresh");
  if (!seconds || !box) { return; }
  var key = "silo-autorefresh";
  var on = true;
  try { on = window.localStorage.getItem(key) !== "off"; } catch (e) { on = true; }
  box.checked = on;
  box.parentNode.hidden = false;
  var timer = null;
  function arm() {
    if (timer) { window.clearTimeout(timer); timer = null; }
    if (box.checked) { timer = window.setTimeout(function () { window.location.reload(); }, seconds * 1000); }
  }
  box.addEventListener("change", function () {
    try { window.localStorage.setItem(key, box.checked ? "on" : "off"); } catch (e) { /* private mode */ }
    arm();
  });
  arm();
}());
