/*
 * gw_hcheck.c - the active health checker (see gw_hcheck.h).
 *
 * Everything below the mailbox runs on the checker's thread: the main
 * thread only posts a configuration (or the stop) under hc.mtx and wakes
 * the loop through an eventfd. Each checked server is a target with one
 * timer, which says when the next check is due while none runs and when
 * the running check times out while one does. A check's bufferevent is
 * freed by finish(), from the bufferevent's own callbacks or the timer
 * (libevent defers the free of a bufferevent whose callback is running).
 */
#include "gw_hcheck.h"
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_dns.h"
#include "gw_log.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct {
    const gw_backend_t *b; /* of hc.cfg */
    const gw_peer_t *s;
    struct event *timer; /* the next check while idle; the running check's timeout */
    gw_dns_name_t name;  /* host name servers */
    bool has_name;
    struct bufferevent *bev; /* the running check's connection */
    bool running;
    bool resolving; /* running, waiting for the name's first answer */
    bool connected;
    uint64_t due_ms; /* when the next check is due (idle) */
} target_t;

static struct {
    bool running;
    pthread_t thread;
    struct event_base *base;
    int wake_fd;
    struct event *wake_ev;
    pthread_mutex_t mtx;    /* guards the mail_ fields */
    gw_config_t *mail_cfg;  /* a reference: the configuration to switch to */
    gw_dns_sys_t *mail_sys; /* a reference: the resolver's files, when the checker has no resolver yet */
    bool mail_stop;
    bool sys_sent; /* main thread: the resolver's files were loaded (at start or posted) */
    /* the checker thread's own (and the main thread's before it runs or after it ended) */
    gw_config_t *cfg; /* a reference */
    target_t *targets;
    size_t ntargets;
    gw_dns_sys_t *sys; /* a reference, once a backend had a host name */
    gw_dns_t *dns;
    gw_config_t *dns_cfg; /* a reference: the resolver's settings (it borrows them) */
    uint64_t rng;
} hc = {.wake_fd = -1, .mtx = PTHREAD_MUTEX_INITIALIZER};

static uint64_t
rnd(void)
{
    uint64_t x = hc.rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    hc.rng = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static void
arm(target_t *t, uint64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(t->timer, &tv);
}

/* interval_ms +-10% */
static uint64_t
jittered(const gw_hc_conf_t *c)
{
    uint64_t span = (uint64_t)c->interval_ms / 5; /* 20% */
    return (uint64_t)c->interval_ms - span / 2 + (span ? rnd() % (span + 1) : 0);
}

/* Closes what the running check holds (no callback follows). */
static void
abandon(target_t *t)
{
    if (t->bev != NULL) {
        bufferevent_free(t->bev);
        t->bev = NULL;
    }
    t->running = t->resolving = t->connected = false;
}

/* The running check of t ended with r (why: for the log line). */
static void
finish(target_t *t, gw_hc_result_t r, const char *why)
{
    abandon(t);
    unsigned row = 0;
    int change = gw_cluster_checked(t->b, t->s, r, &row);
    if (change < 0)
        gw_log_rl(GW_LOG_WARN, "backend %s server %s is unhealthy: %s (%u in a row)", t->b->name, t->s->label, why,
                  row);
    else if (change > 0)
        gw_log_rl(GW_LOG_NOTICE, "backend %s server %s is healthy again (%u checks in a row passed)", t->b->name,
                  t->s->label, row);
    else if (r != GW_HC_OK)
        gw_log_debug("backend %s server %s: health check failed: %s", t->b->name, t->s->label, why);
    uint64_t next = jittered(t->b->health_check);
    t->due_ms = gw_now_ms() + next;
    arm(t, next);
}

/* Looks at what arrived: the status line decides. */
static void
read_cb(struct bufferevent *bev, void *arg)
{
    target_t *t = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t len = evbuffer_get_length(in);
    struct evbuffer_ptr eol = evbuffer_search_eol(in, NULL, NULL, EVBUFFER_EOL_CRLF);
    if (eol.pos < 0) {
        if (len >= GW_HCHECK_MAX_HEAD)
            finish(t, GW_HC_BAD_RESPONSE, "no status line in the first 16 KiB of the health check's answer");
        return;
    }
    char line[64];
    size_t n = GW_MIN((size_t)eol.pos, sizeof(line) - 1);
    evbuffer_copyout(in, line, n);
    line[n] = '\0';
    int status = 0;
    if (n >= 12 && strncmp(line, "HTTP/1.", 7) == 0 && line[8] == ' ' && line[9] >= '1' && line[9] <= '5' &&
        line[10] >= '0' && line[10] <= '9' && line[11] >= '0' && line[11] <= '9' && (n == 12 || line[12] == ' '))
        status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    if (status == 0) {
        finish(t, GW_HC_BAD_RESPONSE, "the health check's answer is not HTTP");
        return;
    }
    const gw_hc_conf_t *c = t->b->health_check;
    for (size_t i = 0; i < c->nstatuses; i++) {
        if (c->statuses[i] == status) {
            finish(t, GW_HC_OK, "");
            return;
        }
    }
    char why[64];
    snprintf(why, sizeof(why), "status %d from health check", status);
    finish(t, GW_HC_STATUS, why);
}

static void
event_cb(struct bufferevent *bev, short what, void *arg)
{
    target_t *t = arg;
    char why[320];
    if (what & BEV_EVENT_CONNECTED) {
        t->connected = true;
        return;
    }
    if (what & BEV_EVENT_EOF) {
        read_cb(bev, arg); /* a complete status line may have come with the close */
        if (t->running)
            finish(t, GW_HC_BAD_RESPONSE, "the health check's connection closed before a status line");
        return;
    }
    int err = EVUTIL_SOCKET_ERROR();
    if (t->b->tls && !t->connected && (bufferevent_get_openssl_error(bev) || err == 0)) {
        SSL *ssl = bufferevent_openssl_get_ssl(bev);
        long vr = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
        unsigned long e = bufferevent_get_openssl_error(bev);
        char ebuf[256] = "connection closed during the TLS handshake";
        if (vr != X509_V_OK)
            snprintf(ebuf, sizeof(ebuf), "certificate verify failed: %s", X509_verify_cert_error_string(vr));
        else if (e)
            ERR_error_string_n(e, ebuf, sizeof(ebuf));
        snprintf(why, sizeof(why), "health check: TLS handshake failed: %s", ebuf);
        finish(t, GW_HC_TLS, why);
        return;
    }
    snprintf(why, sizeof(why), "health check %s: %s", t->connected ? "connection failed" : "cannot connect",
             err ? strerror(err) : "connection reset");
    finish(t, GW_HC_CONNECT, why);
}

/* Connects t's check to sa and queues the request. */
static void
connect_to(target_t *t, const struct sockaddr *sa, socklen_t salen)
{
    const gw_backend_t *b = t->b;
    const gw_peer_t *s = t->s;
    if (b->tls) {
        SSL *ssl = SSL_new(b->ssl_ctx);
        if (ssl == NULL) {
            finish(t, GW_HC_TLS, "health check: cannot create a TLS session");
            return;
        }
        if (s->tls_name_is_ip) {
            if (b->tls_verify)
                X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), s->tls_server_name);
        } else {
            SSL_set_tlsext_host_name(ssl, s->tls_server_name);
            if (b->tls_verify)
                SSL_set1_host(ssl, s->tls_server_name);
        }
        t->bev = bufferevent_openssl_socket_new(hc.base, -1, ssl, BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
        if (t->bev == NULL) {
            SSL_free(ssl);
            finish(t, GW_HC_TLS, "health check: cannot create a TLS connection");
            return;
        }
        bufferevent_openssl_set_allow_dirty_shutdown(t->bev, 1);
    } else {
        t->bev = bufferevent_socket_new(hc.base, -1, BEV_OPT_CLOSE_ON_FREE);
        if (t->bev == NULL) {
            finish(t, GW_HC_CONNECT, "health check: cannot create a connection");
            return;
        }
    }
    bufferevent_setwatermark(t->bev, EV_READ, 0, GW_HCHECK_MAX_HEAD);
    evbuffer_add_printf(bufferevent_get_output(t->bev),
                        "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: gatherd-health-check\r\n"
                        "Accept: */*\r\n\r\n",
                        b->health_check->path, s->host_header);
    if (bufferevent_socket_connect(t->bev, sa, (int)salen) != 0) {
        char why[160];
        snprintf(why, sizeof(why), "health check cannot connect: %s", strerror(errno));
        finish(t, GW_HC_CONNECT, why);
        return;
    }
    bufferevent_setcb(t->bev, read_cb, NULL, event_cb, t);
    bufferevent_enable(t->bev, EV_READ | EV_WRITE);
}

/* With an address of t's name, or its failure. */
static void
name_ready(target_t *t)
{
    const gw_dns_addr_t *a;
    size_t idx;
    int rc = gw_dns_name_pick(&t->name, &a, &idx);
    if (rc == GW_AGAIN) {
        t->resolving = true;
        return;
    }
    t->resolving = false;
    if (rc != GW_OK) {
        char why[256];
        snprintf(why, sizeof(why), "health check cannot resolve \"%s\": %s", t->s->host_name, t->name.errtext);
        finish(t, GW_HC_CONNECT, why);
        return;
    }
    connect_to(t, (const struct sockaddr *)&a->sa, a->len);
}

static void
name_cb(gw_dns_name_t *n, void *arg)
{
    GW_UNUSED(n);
    target_t *t = arg;
    if (t->running && t->resolving)
        name_ready(t);
}

static void
start_check(target_t *t)
{
    t->running = true;
    t->connected = false;
    arm(t, (uint64_t)t->b->health_check->timeout_ms);
    if (t->s->host_name == NULL) {
        connect_to(t, (const struct sockaddr *)&t->s->addr, t->s->addrlen);
        return;
    }
    if (hc.dns == NULL) {
        finish(t, GW_HC_CONNECT, "health check: no resolver for host names");
        return;
    }
    if (!t->has_name) {
        gw_dns_name_init(&t->name, hc.dns, t->s->host_name, t->s->port, name_cb, t);
        t->has_name = true;
    }
    name_ready(t);
}

static void
timer_cb(evutil_socket_t fd, short what, void *arg)
{
    GW_UNUSED(fd);
    GW_UNUSED(what);
    target_t *t = arg;
    if (!t->running) {
        start_check(t);
        return;
    }
    char why[96];
    snprintf(why, sizeof(why), "health check timed out after %d ms%s", t->b->health_check->timeout_ms,
             t->resolving   ? " resolving the name"
             : t->connected ? ""
                            : " connecting");
    finish(t, GW_HC_TIMEOUT, why);
}

static void
targets_free(target_t *ts, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        abandon(&ts[i]);
        if (ts[i].has_name)
            gw_dns_name_free(&ts[i].name);
        event_free(ts[i].timer);
    }
    free(ts);
}

/* Switches to cfg (taken over): targets for its checked servers; one that
 * kept its shared state (a reload that changed nothing about it) keeps
 * its schedule. */
static void
switch_to(gw_config_t *cfg)
{
    size_t n = 0;
    for (size_t i = 0; i < cfg->nbackends; i++)
        if (cfg->backends[i]->health_check != NULL)
            n += cfg->backends[i]->nservers;
    target_t *ts = n ? gw_calloc(n, sizeof(target_t)) : NULL;
    uint64_t now = gw_now_ms();
    size_t k = 0;
    for (size_t i = 0; i < cfg->nbackends; i++) {
        const gw_backend_t *b = cfg->backends[i];
        if (b->health_check == NULL)
            continue;
        for (size_t si = 0; si < b->nservers; si++) {
            target_t *t = &ts[k++];
            t->b = b;
            t->s = &b->servers[si];
            t->timer = evtimer_new(hc.base, timer_cb, t);
            uint64_t delay = rnd() % ((uint64_t)b->health_check->interval_ms / 10 + 1);
            for (size_t o = 0; o < hc.ntargets; o++) {
                const target_t *old = &hc.targets[o];
                if (old->s->hs == t->s->hs) {
                    /* kept: due when it was, or at once when a check was running */
                    delay = old->running || old->due_ms <= now ? 0 : old->due_ms - now;
                    break;
                }
            }
            t->due_ms = now + delay;
            arm(t, delay);
        }
    }
    targets_free(hc.targets, hc.ntargets);
    hc.targets = ts;
    hc.ntargets = n;
    gw_config_unref(hc.cfg);
    hc.cfg = cfg;
}

/* The main thread posted something. */
static void
wake_cb(evutil_socket_t fd, short what, void *arg)
{
    GW_UNUSED(what);
    GW_UNUSED(arg);
    uint64_t v;
    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        gw_log(GW_LOG_ERR, "health checker: reading its wake-up: %s", strerror(errno));
    pthread_mutex_lock(&hc.mtx);
    bool stop = hc.mail_stop;
    gw_config_t *cfg = hc.mail_cfg;
    gw_dns_sys_t *sys = hc.mail_sys;
    hc.mail_cfg = NULL;
    hc.mail_sys = NULL;
    pthread_mutex_unlock(&hc.mtx);
    if (sys != NULL && hc.dns == NULL && cfg != NULL) {
        char err[512];
        hc.dns = gw_dns_new(hc.base, cfg, sys, 0, err, sizeof(err));
        if (hc.dns == NULL) {
            gw_log(GW_LOG_ERR, "health checker: resolver: %s", err);
        } else {
            hc.dns_cfg = gw_config_ref(cfg);
            hc.sys = gw_dns_sys_ref(sys);
        }
    }
    gw_dns_sys_unref(sys);
    if (stop) {
        gw_config_unref(cfg);
        targets_free(hc.targets, hc.ntargets);
        hc.targets = NULL;
        hc.ntargets = 0;
        event_base_loopbreak(hc.base);
        return;
    }
    if (cfg != NULL)
        switch_to(cfg);
}

static void *
checker_main(void *arg)
{
    GW_UNUSED(arg);
    gw_log_set_thread("hcheck");
    event_base_dispatch(hc.base);
    return NULL;
}

static void
wake(void)
{
    uint64_t one = 1;
    if (write(hc.wake_fd, &one, sizeof(one)) < 0)
        gw_log(GW_LOG_ERR, "health checker: cannot wake it: %s", strerror(errno));
}

static void
checker_free(void)
{
    targets_free(hc.targets, hc.ntargets);
    hc.targets = NULL;
    hc.ntargets = 0;
    if (hc.dns != NULL)
        gw_dns_free(hc.dns);
    hc.dns = NULL;
    if (hc.wake_ev != NULL)
        event_free(hc.wake_ev);
    hc.wake_ev = NULL;
    if (hc.base != NULL)
        event_base_free(hc.base);
    hc.base = NULL;
    if (hc.wake_fd >= 0)
        close(hc.wake_fd);
    hc.wake_fd = -1;
    gw_config_unref(hc.cfg);
    gw_config_unref(hc.dns_cfg);
    gw_dns_sys_unref(hc.sys);
    hc.cfg = hc.dns_cfg = NULL;
    hc.sys = NULL;
    pthread_mutex_lock(&hc.mtx);
    gw_config_t *mc = hc.mail_cfg;
    gw_dns_sys_t *ms = hc.mail_sys;
    hc.mail_cfg = NULL;
    hc.mail_sys = NULL;
    hc.mail_stop = false;
    pthread_mutex_unlock(&hc.mtx);
    hc.sys_sent = false;
    gw_config_unref(mc);
    gw_dns_sys_unref(ms);
}

/* Whether a backend of cfg has active checks: the checker's thread, loop
 * and descriptors exist only then (a reload that adds the first check
 * starts it). */
static bool
any_check(const gw_config_t *cfg)
{
    for (size_t i = 0; i < cfg->nbackends; i++)
        if (cfg->backends[i]->health_check != NULL)
            return true;
    return false;
}

int
gw_hcheck_start(gw_config_t *cfg, char *err, size_t errlen)
{
    if (!any_check(cfg))
        return GW_OK;
    hc.rng = gw_now_ns() ^ 0x9e3779b97f4a7c15ULL;
    if (hc.rng == 0)
        hc.rng = 1;
    hc.base = event_base_new();
    hc.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (hc.base == NULL || hc.wake_fd < 0) {
        snprintf(err, errlen, "health checker: cannot create its event loop: %s", strerror(errno));
        checker_free();
        return GW_ERR;
    }
    hc.wake_ev = event_new(hc.base, hc.wake_fd, EV_READ | EV_PERSIST, wake_cb, NULL);
    event_add(hc.wake_ev, NULL);
    if (cfg->nnamed > 0) {
        gw_dns_sys_t *sys = gw_dns_sys_load(cfg, NULL, err, errlen);
        if (sys == NULL) {
            checker_free();
            return GW_ERR;
        }
        hc.dns = gw_dns_new(hc.base, cfg, sys, 0, err, errlen);
        if (hc.dns == NULL) {
            gw_dns_sys_unref(sys);
            checker_free();
            return GW_ERR;
        }
        hc.sys = sys;
        hc.dns_cfg = gw_config_ref(cfg);
        hc.sys_sent = true;
    }
    switch_to(gw_config_ref(cfg));
    int rc = pthread_create(&hc.thread, NULL, checker_main, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "health checker: cannot start its thread: %s", strerror(rc));
        checker_free();
        return GW_ERR;
    }
    hc.running = true;
    return GW_OK;
}

void
gw_hcheck_reload(gw_config_t *cfg)
{
    if (!hc.running) {
        char err[512];
        if (gw_hcheck_start(cfg, err, sizeof(err)) != GW_OK)
            gw_log(GW_LOG_ERR, "%s; no health checks run until a reload or restart", err);
        return;
    }
    gw_dns_sys_t *sys = NULL;
    if (cfg->nnamed > 0 && !hc.sys_sent) {
        /* the first host name: the files are read here, on the main thread */
        char err[512];
        sys = gw_dns_sys_load(cfg, NULL, err, sizeof(err));
        if (sys == NULL)
            gw_log(GW_LOG_ERR, "health checker: %s; host names will not be checked", err);
        hc.sys_sent = sys != NULL;
    }
    gw_config_ref(cfg);
    pthread_mutex_lock(&hc.mtx);
    gw_config_t *old = hc.mail_cfg;
    gw_dns_sys_t *olds = hc.mail_sys;
    hc.mail_cfg = cfg;
    hc.mail_sys = sys ? sys : olds;
    pthread_mutex_unlock(&hc.mtx);
    if (sys != NULL)
        gw_dns_sys_unref(olds);
    gw_config_unref(old);
    wake();
}

void
gw_hcheck_stop(void)
{
    if (hc.running) {
        pthread_mutex_lock(&hc.mtx);
        hc.mail_stop = true;
        pthread_mutex_unlock(&hc.mtx);
        wake();
        pthread_join(hc.thread, NULL);
        hc.running = false;
    }
    checker_free();
}
