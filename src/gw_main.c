/*
 * gw_main.c - the command line, start-up and signals.
 *
 * The main thread owns no connections: it loads the configuration, starts
 * the workers, then waits for signals with sigtimedwait() (every thread
 * blocks them, so no handler ever runs on a worker). SIGTERM and SIGINT
 * stop gracefully; a second one stops at once. SIGHUP reloads the
 * configuration: it is loaded and checked here, off the workers' loops, and
 * published only when valid (gw_server_reload).
 *
 * "gatherd -s reload|stop|quit" signals the running daemon whose pid is in
 * the pid file (--pid, else the configuration's "pid_file"), like nginx -s.
 */
#include "gw_admin.h"
#include "gw_alog.h"
#include "gw_breaker.h"
#include "gw_cluster.h"
#include "gw_hcheck.h"
#include "gw_budget.h"
#include "gw_cache.h"
#include "gw_config.h"
#include "gw_daemon.h"
#include "gw_json.h"
#include "gw_log.h"
#include "gw_metrics.h"
#include "gw_notify.h"
#include "gw_ratelimit.h"
#include "gw_retry.h"
#include "gw_server.h"
#include "gw_tpool.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <llhttp.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef GW_DEFAULT_CONF
#define GW_DEFAULT_CONF "/etc/gatherd/gatherd.json"
#endif
#define GW_SOURCE_CONF "conf/gatherd.json"

static void
usage(FILE *f)
{
    fprintf(f,
            "Usage: gatherd [-t] [-d] [-c FILE] [-w N] [-l LEVEL] [--pid FILE] [-s SIGNAL]\n"
            "  -c FILE   configuration file (default: %s when it exists, else %s)\n"
            "  -t        check the configuration and exit (0: valid, 1: invalid)\n"
            "  -d        run in the background; exits 0 once the daemon is ready, 1 when it failed to start\n"
            "  --pid FILE  write the process id to FILE (overrides \"pid_file\")\n"
            "  -s SIGNAL send SIGNAL to the running daemon named by the pid file and exit:\n"
            "            reload (HUP: re-read the configuration), stop (TERM: graceful), quit (QUIT: at once)\n"
            "  -w N      number of worker threads, overriding \"workers\"\n"
            "  -l LEVEL  log level: debug, info, notice (default), warn, error\n"
            "  -V        print the version and exit\n"
            "  -h        print this help and exit\n"
            "Signals: TERM/INT stop gracefully (a second one stops at once), QUIT stops at once,\n"
            "HUP reloads the configuration (an invalid one is logged and ignored), USR1 reopens the log files.\n",
            GW_SOURCE_CONF, GW_DEFAULT_CONF);
}

static int
parse_level(const char *s, gw_log_level_t *out)
{
    static const char *const names[] = { "debug", "info", "notice", "warn", "error" };
    for (size_t i = 0; i < GW_NELEM(names); i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (gw_log_level_t)i;
            return GW_OK;
        }
    return GW_ERR;
}

/* Reads the pid in path; 0 with a message on stderr when there is none. */
static pid_t
read_pid(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "gatherd: cannot read the pid file %s: %s\n", path, strerror(errno));
        return 0;
    }
    long pid = 0;
    int n = fscanf(f, "%ld", &pid);
    fclose(f);
    if (n != 1 || pid <= 1) {
        fprintf(stderr, "gatherd: the pid file %s holds no process id\n", path);
        return 0;
    }
    return (pid_t)pid;
}

/* Sends the -s signal to the daemon of pid_path; the exit status. */
static int
send_signal(const char *name, const char *pid_path)
{
    static const struct {
        const char *name;
        int sig;
    } sigs[] = { { "reload", SIGHUP }, { "stop", SIGTERM }, { "quit", SIGQUIT } };
    int sig = 0;
    for (size_t i = 0; i < GW_NELEM(sigs); i++)
        if (strcmp(name, sigs[i].name) == 0)
            sig = sigs[i].sig;
    if (sig == 0) {
        fprintf(stderr, "gatherd: -s wants reload, stop or quit, not \"%s\"\n", name);
        return 1;
    }
    if (pid_path == NULL) {
        fprintf(stderr, "gatherd: -s %s needs the pid file: --pid FILE or \"pid_file\" in the configuration\n", name);
        return 1;
    }
    pid_t pid = read_pid(pid_path);
    if (pid == 0)
        return 1;
    if (kill(pid, sig) != 0) {
        fprintf(stderr, "gatherd: cannot signal process %ld (from %s): %s\n", (long)pid, pid_path, strerror(errno));
        return 1;
    }
    return 0;
}

static int
write_pid(const char *path)
{
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        gw_log(GW_LOG_EMERG, "cannot write the pid file %s: %s", tmp, strerror(errno));
        return GW_ERR;
    }
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
    bool ok = write(fd, buf, (size_t)n) == n;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) { /* atomic: "-s" never reads half a file */
        gw_log(GW_LOG_EMERG, "cannot write the pid file %s: %s", path, strerror(errno));
        unlink(tmp);
        return GW_ERR;
    }
    return GW_OK;
}

/* -l LEVEL was given: it wins over "log.level". */
static bool level_from_cmdline;

/* The process-wide memory budgets ("memory") of cfg. */
static void
apply_budgets(const gw_config_t *cfg)
{
    gw_budget_set_limit(&gw_budget_bodies, cfg->memory.request_body_bytes);
    gw_budget_set_limit(&gw_budget_responses, cfg->memory.response_body_bytes);
    gw_cache_set_max_bytes(cfg->cache.max_bytes);
}

/* Whether two address lists are the same, in the same order. */
static bool
same_listen(const gw_listen_t *a, size_t na, const gw_listen_t *b, size_t nb)
{
    if (na != nb)
        return false;
    for (size_t i = 0; i < na; i++)
        if (a[i].addrlen != b[i].addrlen || memcmp(&a[i].addr, &b[i].addr, a[i].addrlen) != 0)
            return false;
    return true;
}

/* SIGHUP: a new configuration for new requests, or a log line saying why not. */
static void
reload(gw_server_t *srv, gw_config_t **cfg, const char *file, bool workers_fixed)
{
    char err[2048];
    gw_log(GW_LOG_NOTICE, "SIGHUP: reloading configuration %s", file);
    gw_config_t *next = gw_config_load(file, srv->nworkers, err, sizeof(err));
    if (next == NULL) {
        gw_log(GW_LOG_ERR, "reload failed, still running the previous configuration: %s", err);
        gw_metrics_reloaded(false);
        return;
    }
    gw_breaker_inherit(next, *cfg); /* unchanged breakers keep their state */
    gw_cluster_inherit(next, *cfg); /* unchanged servers keep their health, ejection and counters */
    gw_ratelimit_inherit(next, *cfg); /* unchanged limits keep their buckets */
    gw_retry_inherit(next, *cfg); /* unchanged retry sections keep their budget counters */
    gw_cache_inherit(next, *cfg); /* unchanged cached calls keep their entries */
    if (gw_server_reload(srv, next, err, sizeof(err)) != GW_OK) {
        gw_log(GW_LOG_ERR, "reload failed, still running the previous configuration: %s", err);
        gw_config_unref(next);
        gw_metrics_reloaded(false);
        return;
    }
    for (size_t i = 0; i < next->nbackends; i++)
        if (next->backends[i]->tls && !next->backends[i]->tls_verify)
            gw_log(GW_LOG_WARN, "backend %s: TLS certificate verification is OFF (tls.verify: false)",
                   next->backends[i]->name);
    if (!level_from_cmdline)
        gw_log_set_level((gw_log_level_t)next->log.level);
    apply_budgets(next);
    gw_tpool_set_max_queue(next->thread_pool.max_queue);
    if (next->thread_pool.threads != gw_tpool_threads())
        gw_log(GW_LOG_WARN, "reload: \"thread_pool\" asks for %u threads; %u keep running until a restart",
               next->thread_pool.threads, gw_tpool_threads());
    gw_alog_apply(next);
    gw_log(GW_LOG_NOTICE, "configuration %s reloaded: %zu routes, %zu backends, %zu listen addresses", file,
           next->nroutes, next->nbackends, next->nlisten);
    if (!workers_fixed && next->workers_conf != srv->nworkers)
        gw_log(GW_LOG_WARN, "reload: \"workers\" asks for %d threads; %d keep running until a restart",
               next->workers_conf, srv->nworkers);
    if (gw_server_resolver_differs(srv, next))
        gw_log(GW_LOG_WARN, "reload: \"resolver\" changed; the running resolvers keep their settings until a "
                            "restart");
    if (!same_listen(next->admin_listen, next->nadmin, (*cfg)->admin_listen, (*cfg)->nadmin))
        gw_log(GW_LOG_WARN, "reload: \"admin\" \"listen\" changed; the admin listener keeps its addresses until a "
                            "restart");
    if ((next->user == NULL) != ((*cfg)->user == NULL) ||
        (next->user && (next->uid != (*cfg)->uid || next->gid != (*cfg)->gid)))
        gw_log(GW_LOG_WARN, "reload: \"user\"/\"group\" changed; the process keeps its account until a restart");
    gw_cache_retire_dropped(*cfg, next); /* the entries of calls changed or gone are dropped */
    gw_admin_publish(next);
    gw_hcheck_reload(next);
    gw_metrics_reloaded(true);
    gw_config_unref(*cfg);
    *cfg = next;
}

/* A start that failed after gw_server_start: logs why (unless NULL), stops
 * and frees what runs, removes pid_file (ours: written by this process)
 * and frees it. The exit status. */
static int
abort_start(gw_server_t *srv, gw_config_t *cfg, char *pid_file, const char *why)
{
    if (why)
        gw_log(GW_LOG_EMERG, "%s", why);
    gw_hcheck_stop();
    gw_admin_stop(); /* first: its thread reads srv */
    gw_server_stop(srv, true);
    gw_server_free(srv);
    gw_config_unref(cfg);
    if (pid_file) {
        unlink(pid_file);
        free(pid_file);
    }
    gw_alog_stop(); /* the reason reaches the error log */
    return 1;
}

int
main(int argc, char **argv)
{
    const char *file = NULL;
    const char *pid_opt = NULL;
    const char *signal_name = NULL;
    bool test_only = false;
    bool detach = false;
    int workers = 0;
    int opt;
    static const struct option longopts[] = { { "pid", required_argument, NULL, 'p' }, { NULL, 0, NULL, 0 } };
    gw_alloc_init();
    while ((opt = getopt_long(argc, argv, "c:tw:l:s:Vhd", longopts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            pid_opt = optarg;
            break;
        case 's':
            signal_name = optarg;
            break;
        case 'c':
            file = optarg;
            break;
        case 't':
            test_only = true;
            break;
        case 'd':
            detach = true;
            break;
        case 'w': {
            char *end;
            long n = strtol(optarg, &end, 10);
            if (*end != '\0' || n < 1 || n > GW_CONF_MAX_WORKERS) {
                fprintf(stderr, "gatherd: -w wants a number between 1 and %d\n", GW_CONF_MAX_WORKERS);
                return 1;
            }
            workers = (int)n;
            break;
        }
        case 'l': {
            gw_log_level_t level;
            if (parse_level(optarg, &level) != GW_OK) {
                fprintf(stderr, "gatherd: unknown log level \"%s\"\n", optarg);
                return 1;
            }
            gw_log_set_level(level);
            level_from_cmdline = true;
            break;
        }
        case 'V':
            printf("gatherd %s\n", PACKAGE_VERSION);
            printf("libevent %s, jansson %s, llhttp %d.%d.%d\n", event_get_version(), JANSSON_VERSION,
                   LLHTTP_VERSION_MAJOR, LLHTTP_VERSION_MINOR, LLHTTP_VERSION_PATCH);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "gatherd: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 1;
    }
    if (file == NULL)
        file = access(GW_SOURCE_CONF, R_OK) == 0 ? GW_SOURCE_CONF : GW_DEFAULT_CONF;

    char err[2048];
    gw_json_alloc_init(); /* before jansson allocates anything, and before any thread */
    /* No fastbins: glibc otherwise keeps freed small chunks (a freed tree of
     * a million nodes) unmerged until some later free of 64 KiB or more
     * merges them all at once, on whichever thread does that free: 480 ms
     * on a worker after an 8 MB answer was freed on the thread pool. The
     * per-thread caches (tcache) still serve small allocations. */
    mallopt(M_MXFAST, 0);
    gw_config_t *cfg = gw_config_load(file, workers, err, sizeof(err));
    if (signal_name) {
        const char *pid_path = pid_opt ? pid_opt : cfg ? cfg->pid_file : NULL;
        if (pid_path == NULL && cfg == NULL && pid_opt == NULL)
            fprintf(stderr, "gatherd: %s\n", err);
        int rc = send_signal(signal_name, pid_path);
        gw_config_unref(cfg);
        return rc;
    }
    if (test_only) {
        if (cfg == NULL) {
            fprintf(stderr, "gatherd: %s\ngatherd: configuration file %s test failed\n", err, file);
            return 1;
        }
        fprintf(stderr, "gatherd: configuration file %s syntax is ok\n"
                        "gatherd: configuration file %s test is successful (%zu routes, %d workers)\n",
                file, file, cfg->nroutes, cfg->workers);
        gw_config_unref(cfg);
        return 0;
    }
    if (cfg == NULL) {
        gw_log(GW_LOG_EMERG, "%s", err);
        return 1;
    }

    if (detach && gw_daemon_detach(cfg->log.error_path, err, sizeof(err)) != GW_OK) { /* before any thread */
        gw_log(GW_LOG_EMERG, "%s", err);
        gw_config_unref(cfg);
        return 1;
    }
    if (!level_from_cmdline)
        gw_log_set_level((gw_log_level_t)cfg->log.level);
    apply_budgets(cfg);
    if (gw_alog_start(cfg, err, sizeof(err)) != GW_OK) {
        gw_log(GW_LOG_EMERG, "%s", err);
        gw_config_unref(cfg);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGQUIT);
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* inherited by every worker */

    gw_daemon_raise_nofile(cfg);
    gw_server_t srv;
    if (gw_server_start(&srv, cfg, err, sizeof(err)) != GW_OK)
        return abort_start(&srv, cfg, NULL, err);
    gw_admin_publish(cfg);
    if (gw_admin_start(cfg, &srv, err, sizeof(err)) != GW_OK)
        return abort_start(&srv, cfg, NULL, err);
    const char *pid_path = pid_opt ? pid_opt : cfg->pid_file;
    char *pid_file = pid_path ? gw_strdup(pid_path) : NULL; /* a reload does not move it */
    if (pid_file && write_pid(pid_file) != GW_OK) { /* it logged why; the path may be another gatherd's */
        free(pid_file);
        return abort_start(&srv, cfg, NULL, NULL);
    }
    /* every socket is bound and no thread has read a request yet */
    if (gw_daemon_drop_privileges(cfg, err, sizeof(err)) != GW_OK ||
        gw_server_run(&srv, err, sizeof(err)) != GW_OK || gw_admin_run(cfg, err, sizeof(err)) != GW_OK ||
        gw_hcheck_start(cfg, err, sizeof(err)) != GW_OK)
        return abort_start(&srv, cfg, pid_file, err);
    for (size_t i = 0; i < cfg->nlisten; i++)
        gw_log(GW_LOG_NOTICE, "listening on %s", cfg->listen[i].text);
    for (size_t i = 0; i < cfg->nbackends; i++)
        if (cfg->backends[i]->tls && !cfg->backends[i]->tls_verify)
            gw_log(GW_LOG_WARN, "backend %s: TLS certificate verification is OFF (tls.verify: false); "
                                "anyone on the path can impersonate it", cfg->backends[i]->name);
    gw_log(GW_LOG_NOTICE, "gatherd %s started: %d workers, %zu routes, configuration %s", PACKAGE_VERSION,
           cfg->workers, cfg->nroutes, file);
    gw_alog_sync(1000); /* the start-up lines are out when the daemon says it is ready */
    if (gw_notify_init() == GW_OK)
        gw_notify_ready(); /* listeners bound, workers running */
    gw_daemon_ready(cfg->log.error_path == NULL); /* -d: the parent exits 0 */

    bool stopping = false;
    struct timespec tick = { 0, 100 * 1000 * 1000 };
    for (;;) {
        int sig = sigtimedwait(&sigs, NULL, &tick);
        if (sig == SIGTERM || sig == SIGINT || sig == SIGQUIT) {
            bool force = stopping || sig == SIGQUIT;
            gw_log(GW_LOG_NOTICE, "signal %d (%s): %s", sig, strsignal(sig),
                   force ? "stopping now" : "stopping gracefully");
            if (!stopping) {
                gw_notify_stopping();
                gw_admin_drain();
            }
            gw_server_stop(&srv, force);
            stopping = true;
        } else if (sig == SIGHUP) {
            if (stopping)
                gw_log(GW_LOG_NOTICE, "SIGHUP while stopping: ignored");
            else {
                gw_notify_reloading();
                reload(&srv, &cfg, file, workers > 0);
                gw_notify_reloaded(); /* applied or refused: running either way */
            }
        } else if (sig == SIGUSR1) {
            gw_log(GW_LOG_NOTICE, "SIGUSR1: reopening the log files");
            gw_alog_reopen();
        } else if (sig < 0 && errno != EAGAIN && errno != EINTR) {
            gw_log(GW_LOG_ERR, "sigtimedwait: %s", strerror(errno));
        }
        if (gw_server_done(&srv))
            break;
    }
    gw_hcheck_stop();
    gw_admin_stop();
    gw_server_free(&srv);
    gw_config_unref(cfg);
    gw_cache_shutdown();
    gw_notify_close();
    if (pid_file) {
        if (unlink(pid_file) != 0 && errno != ENOENT) /* e.g. "user" cannot write its directory */
            gw_log(GW_LOG_WARN, "cannot remove the pid file %s: %s", pid_file, strerror(errno));
        free(pid_file);
    }
    gw_log(GW_LOG_NOTICE, "stopped");
    gw_alog_stop();
    libevent_global_shutdown();
    return 0;
}
