/*
 * libFuzzer driver for templates and JSON paths (src/gw_template.c,
 * src/gw_jpath.c). The first byte picks what the rest is:
 *   0: a target template, 1: a header template, 2: a JSON body template
 *   (when the rest parses as JSON), 3: a JSON path.
 * Whatever compiles is rendered against a fixed, hostile context: a parsed
 * request whose query and headers hold every delimiter, CR LF, NUL, "..",
 * invalid UTF-8; call answers with the same. Besides crashes, leaks and UB
 * it checks what templates promise:
 * - a rendered target starts with "/", holds only URL bytes, every "%"
 *   starts an escape, and each byte other than ALPHA DIGIT "-._~" and "%"
 *   occurs exactly as often as in the template's literal text: a value
 *   never contributes a "/", "?", "&", "=", "#" or anything else raw;
 * - a rendered header value holds no control character;
 * - a rendered JSON body serializes.
 */
#include "gw_http.h"
#include "gw_jpath.h"
#include "gw_router.h"
#include "gw_template.h"

#include <llhttp.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char REQUEST[] =
    "GET /u/a%2Fb%3F%23/f/..%2F..%0D%0A?q=a%2Fb%3Fc%26d%3De%23f%25g&crlf=%0d%0a&dots=..&dot=.&e=&nul=%00"
    "&ff=%FF&u=%C3%A9&bad=%zz&plus=%2B+&flag HTTP/1.1\r\n"
    "Host: h\r\n"
    "X-A: a/b?c=d&e#f%25 g\r\n"
    "X-L: caf\xe9\r\n"
    "\r\n";

static const char ANSWER[] =
    "{\"id\":42,\"s\":\"/?#&=%+ \\r\\n\",\"dots\":\"..\",\"dot\":\".\",\"e\":\"\",\"nul\":\"a\\u0000b\","
    "\"u\":\"\\u00e9\\ud83d\\ude00\",\"n\":null,\"t\":true,\"r\":0.1,\"big\":-9223372036854775808,"
    "\"o\":{\"a\":{\"b\":[1,\"x/y\",{\"c\":\"..\"}]}},\"l\":[\"%2F\",\"?\",[\"#\"]]}";

static const char *const PARAMS[] = { "id", "name" };
static const char *const CALLS[] = { "user", "orders", "none" };
static const gw_tpl_scope_t SCOPE = { PARAMS, 2, CALLS, 3, true, false };

static gw_parser_t parser;
static gw_req_t req;
static gw_router_t *router;
static gw_route_t route = { .where = "fuzz" };
static gw_match_t match;
static json_t *results[3];
static json_t *item;
static gw_tpl_ctx_t ctx;

static void
init(void)
{
    static const gw_http_limits_t limits = {
        .max_header_bytes = 4096, .max_headers = 20, .max_url_bytes = 2048, .max_body_bytes = 64,
    };
    gw_parser_init(&parser, &req, &limits);
    size_t used;
    if (gw_parser_execute(&parser, REQUEST, sizeof(REQUEST) - 1, &used) != GW_PARSE_DONE)
        abort();
    char err[256];
    router = gw_router_new();
    if (gw_router_add(router, "/u/{id}/f/{name}", ~0ULL, &route, err, sizeof(err)) != GW_OK ||
        gw_router_match(router, HTTP_GET, &req.path, &match) != GW_ROUTE_FOUND)
        abort();
    results[0] = json_loads(ANSWER, JSON_ALLOW_NUL, NULL);
    results[1] = json_loads("[{\"id\":\"../x\"},{\"id\":7}]", 0, NULL);
    item = json_loads(ANSWER, JSON_ALLOW_NUL, NULL);
    if (results[0] == NULL || results[1] == NULL || item == NULL)
        abort();
    ctx = (gw_tpl_ctx_t){ .req = &req, .match = &match, .results = results, .nresults = 3, .item = item };
}

static bool
unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

static bool
hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Counts the bytes of the literal text of a template that compiled: "{{"
 * and "}}" are one brace, "{...}" is a placeholder and contributes none. */
static void
literal_counts(const char *src, size_t counts[256])
{
    memset(counts, 0, 256 * sizeof(size_t));
    for (size_t i = 0; src[i] != '\0';) {
        if ((src[i] == '{' || src[i] == '}') && src[i + 1] == src[i]) {
            counts[(unsigned char)src[i]]++;
            i += 2;
        } else if (src[i] == '{') {
            while (src[i] != '\0' && src[i] != '}')
                i++;
            if (src[i] == '}')
                i++;
        } else {
            counts[(unsigned char)src[i++]]++;
        }
    }
}

static void
check_target(const char *src, const char *out, size_t len)
{
    size_t lit[256], got[256] = { 0 };
    literal_counts(src, lit);
    if (len == 0 || out[0] != '/')
        abort();
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)out[i];
        if (c <= 0x20 || c >= 0x7f || c == '#')
            abort();
        if (c == '%' && (i + 2 >= len || !hex((unsigned char)out[i + 1]) || !hex((unsigned char)out[i + 2])))
            abort();
        got[c]++;
    }
    for (int c = 0; c < 256; c++) {
        if (unreserved((unsigned char)c))
            continue;
        if (c == '%' ? got[c] < lit[c] : got[c] != lit[c])
            abort(); /* a value added a delimiter, or a literal one went missing */
    }
}

static void
check_header(const char *out, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)out[i] < 0x20 || out[i] == 0x7f)
            abort();
}

static void
fuzz_text(gw_tpl_kind_t kind, const char *src)
{
    char err[512];
    gw_tpl_t *t = gw_tpl_compile(src, kind, &SCOPE, err, sizeof(err));
    if (t == NULL)
        return;
    gw_tpl_buf_t out = { .limit = 8192 };
    gw_tpl_err_t e = { 0 };
    if (gw_tpl_render(t, &ctx, &out, &e) == GW_OK) {
        if (kind == GW_TPL_TARGET)
            check_target(src, out.data, out.len);
        else
            check_header(out.data, out.len);
    } else if (out.len != 0 || e.code == GW_FAIL_NONE) {
        abort();
    }
    gw_tpl_buf_free(&out);
    gw_tpl_free(t);
}

static void
fuzz_json(const char *src)
{
    json_t *body = json_loads(src, JSON_DECODE_ANY, NULL);
    if (body == NULL)
        return;
    char err[512];
    gw_tpl_json_t *t = gw_tpl_json_compile(body, &SCOPE, err, sizeof(err));
    json_decref(body);
    if (t == NULL)
        return;
    gw_tpl_err_t e = { 0 };
    json_t *out = gw_tpl_json_render(t, &ctx, &e);
    if (out != NULL) {
        char *text = json_dumps(out, JSON_ENCODE_ANY);
        if (text == NULL)
            abort();
        free(text);
        json_decref(out);
    } else if (e.code == GW_FAIL_NONE) {
        abort();
    }
    gw_tpl_json_free(t);
}

static void
fuzz_jpath(const char *src)
{
    char err[256];
    gw_jpath_t *p = gw_jpath_compile(src, err, sizeof(err));
    if (p == NULL)
        return;
    (void)gw_jpath_get(p, results[0]);
    gw_jpath_sel_t *sel = gw_jpath_sel_new(&p, 1);
    json_t *a = gw_jpath_allow(results[0], sel);
    json_t *d = gw_jpath_deny(results[0], sel);
    json_decref(a);
    json_decref(d);
    gw_jpath_sel_free(sel);
    json_t *copy = json_deep_copy(results[0]);
    (void)gw_jpath_set(copy, p, json_integer(1));
    (void)gw_jpath_delete(copy, p);
    json_decref(copy);
    gw_jpath_free(p);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool ready;
    if (!ready) {
        init();
        ready = true;
    }
    if (size < 1)
        return 0;
    char *src = malloc(size);
    if (src == NULL)
        return 0;
    memcpy(src, data + 1, size - 1);
    src[size - 1] = '\0';
    switch (data[0] & 3) {
    case 0: fuzz_text(GW_TPL_TARGET, src); break;
    case 1: fuzz_text(GW_TPL_HEADER, src); break;
    case 2: fuzz_json(src); break;
    default: fuzz_jpath(src); break;
    }
    free(src);
    return 0;
}
