// footfall API docs: Swagger UI over the app's OpenAPI document (a file, not an inline script:
// the page's Content-Security-Policy allows scripts from this server only).
"use strict";
window.ui = SwaggerUIBundle({ url: "/api/v1/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
