/* Unit tests for src/gw_metrics.c: server slots (by backend name and
 * server label, kept across configurations), the per-worker connection
 * gauges summed for the admin thread, label escaping, and a rendering
 * whose label values are whole whatever a backend's name holds. */
#include "gw_config.h"
#include "gw_metrics.h"
#include "gw_test.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Two workers' counters, once for the program. */
static void
init(void)
{
    static bool done;
    if (!done) {
        gw_metrics_init(2);
        done = true;
    }
}

static gw_config_t *
parse(const char *text)
{
    init();
    char err[512];
    gw_config_t *cfg = gw_config_parse(text, "t.json", ".", 1, err, sizeof(err));
    if (cfg == NULL)
        printf("    %s\n", err);
    return cfg;
}

static const gw_backend_t *
backend(const gw_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->nbackends; i++)
        if (strcmp(cfg->backends[i]->name, name) == 0)
            return cfg->backends[i];
    return NULL;
}

static char *
text_of(struct evbuffer *b)
{
    size_t n = evbuffer_get_length(b);
    char *s = malloc(n + 1);
    evbuffer_remove(b, s, n);
    s[n] = '\0';
    return s;
}

static void
test_server_slots_follow_backend_and_label(void)
{
    gw_config_t *a = parse("{\"listen\": [\"1\"], \"backends\": {"
                           "\"x\": {\"servers\": [\"http://127.0.0.1:9001\", \"http://127.0.0.1:9002\"]},"
                           "\"y\": {\"url\": \"http://127.0.0.1:9001\"}}}");
    CHECK(a != NULL);
    if (a == NULL)
        return;
    gw_metrics_bind(a);
    const gw_backend_t *x = backend(a, "x"), *y = backend(a, "y");
    unsigned x1 = x->servers[0].mid, x2 = x->servers[1].mid, y1 = y->servers[0].mid;
    CHECK(x1 != GW_M_SERVER_OTHER && x2 != GW_M_SERVER_OTHER && y1 != GW_M_SERVER_OTHER);
    CHECK(x1 != x2);
    CHECK(x1 != y1); /* the same address under another backend is another series */
    /* a reload: reordered, one added, another setting changed: the kept
     * servers keep their slots */
    gw_config_t *b = parse("{\"listen\": [\"1\"], \"backends\": {"
                           "\"x\": {\"servers\": [\"http://127.0.0.1:9003\", \"http://127.0.0.1:9002\","
                           " \"http://127.0.0.1:9001\"], \"connect_timeout_ms\": 500},"
                           "\"y\": {\"url\": \"http://127.0.0.1:9001\"}}}");
    CHECK(b != NULL);
    if (b != NULL) {
        gw_metrics_bind(b);
        const gw_backend_t *bx = backend(b, "x");
        CHECK(bx->servers[2].mid == x1);
        CHECK(bx->servers[1].mid == x2);
        CHECK(bx->servers[0].mid != x1 && bx->servers[0].mid != x2 && bx->servers[0].mid != y1);
        CHECK(backend(b, "y")->servers[0].mid == y1);
        gw_config_unref(b);
    }
    gw_config_unref(a);
}

static void
test_server_connections_are_summed_over_workers(void)
{
    init();
    gw_mserver_t *w0 = &gw_metrics_worker(0)->servers[7], *w1 = &gw_metrics_worker(1)->servers[7];
    gw_m_gauge(&w0->open, 2);
    gw_m_gauge(&w0->idle, 1);
    gw_m_gauge(&w1->open, 3);
    gw_m_gauge(&w1->idle, 3);
    gw_mserver_t s;
    gw_metrics_server_sum(7, &s);
    CHECK(s.open == 5 && s.idle == 4);
    /* a connection closed after it moved: the deltas still sum right */
    gw_m_gauge(&w1->idle, -1);
    gw_m_gauge(&w1->open, -1);
    gw_metrics_server_sum(7, &s);
    CHECK(s.open == 4 && s.idle == 3);
    /* read between the two updates of a move, idle never exceeds open */
    gw_m_gauge(&w0->idle, 2);
    gw_metrics_server_sum(7, &s);
    CHECK(s.idle <= s.open);
    gw_m_gauge(&w0->idle, -2);
    gw_metrics_server_sum(7, &s);
    CHECK(s.open == 4 && s.idle == 3);
}

static void
test_label_values_are_escaped(void)
{
    struct evbuffer *b = evbuffer_new();
    gw_metrics_label(b, "backend", "a\"b\\c\nd");
    char *s = text_of(b);
    CHECK_STR(s, "backend=\"a\\\"b\\\\c\\nd\"");
    free(s);
    evbuffer_free(b);
}

/* A backend name longer than any fixed buffer, ending with a backslash:
 * the label is whole and closed (a cut one would leave \" open). */
static void
test_render_keeps_long_names_whole(void)
{
    char name[1200];
    memset(name, 'n', sizeof(name));
    name[sizeof(name) - 3] = '\\';
    name[sizeof(name) - 2] = '\\'; /* one backslash in the JSON key */
    name[sizeof(name) - 1] = '\0';
    char text[2000];
    snprintf(text, sizeof(text), "{\"listen\": [\"1\"], \"backends\": {\"%s\": {\"url\": \"http://127.0.0.1:9001\"}}}",
             name);
    gw_config_t *cfg = parse(text);
    CHECK(cfg != NULL);
    if (cfg == NULL)
        return;
    gw_metrics_bind(cfg);
    struct evbuffer *out = evbuffer_new();
    gw_metrics_render(out);
    char *s = text_of(out);
    /* the name as the text format writes it: the backslash doubled */
    char want[1300];
    snprintf(want, sizeof(want), "gatherd_backend_retries_total{backend=\"%.*s\\\\\"} 0\n", (int)sizeof(name) - 3,
             name);
    CHECK_CONTAINS(s, want);
    free(s);
    evbuffer_free(out);
    gw_config_unref(cfg);
}

TEST_MAIN({ "server_slots_follow_backend_and_label", test_server_slots_follow_backend_and_label },
          { "server_connections_are_summed_over_workers", test_server_connections_are_summed_over_workers },
          { "label_values_are_escaped", test_label_values_are_escaped },
          { "render_keeps_long_names_whole", test_render_keeps_long_names_whole })
