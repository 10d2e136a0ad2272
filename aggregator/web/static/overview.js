// footfall overview: sorts the sites' table by the column whose heading is clicked (again:
// the other way). Empty figures sort last.
"use strict";
(function () {
  const table = document.getElementById("overview");
  let key = null, descending = true;
  for (const th of table.querySelectorAll("th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      descending = key === th.dataset.key ? !descending : th.dataset.key !== "name";
      key = th.dataset.key;
      const body = table.tBodies[0];
      const rows = [...body.rows];
      rows.sort((a, b) => {
        const x = a.dataset[key], y = b.dataset[key];
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        const order = key === "name" ? x.localeCompare(y) : Number(x) - Number(y);
        return descending ? -order : order;
      });
      for (const row of rows) { body.appendChild(row); }
      table.dataset.sortedBy = key + (descending ? " desc" : " asc");
    });
  }
})();
