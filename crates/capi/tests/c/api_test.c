/*
 * api_test.c: walks libcc's whole C API as a C program would, under
 * valgrind when the Rust harness (crates/capi/tests/c_api.rs) finds it.
 *
 *   api_test                       library, errors, handles, NULL arguments
 *   api_test --vm REF CACHE [--mounts]
 *                                  ... plus real VMs: pull REF (from the test
 *                                  registry), boot, commands, pipes, files,
 *                                  listeners, dial, expose,
 *                                  snapshots, shutdown. CACHE is the cache
 *                                  directory (to check run dirs go away).
 *
 * Prints one line per failed check and exits non-zero if any failed.
 */
#define _GNU_SOURCE
#include <cc.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <glob.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        checks++;                                                                                  \
        if (!(cond)) {                                                                             \
            failures++;                                                                            \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
        }                                                                                          \
    } while (0)

/* Checks that `call` returned `want`; on a mismatch prints the error. Frees
 * the error either way. */
#define EXPECT(want, call) expect_code(__LINE__, #call, (call), (want), &err)

static cc_error err = CC_ERROR_INIT; /* freed after every failing call */

static const char *str_or(const char *s, const char *dflt) { return s ? s : dflt; }

/* Frees and forgets a buffer (a failed call leaves the pointer alone). */
static void free_bytes(uint8_t **p) {
    cc_bytes_free(*p);
    *p = NULL;
}

static int expect_code(int line, const char *what, cc_error_code got, cc_error_code want,
                       cc_error *e) {
    checks++;
    if (got != want) {
        failures++;
        fprintf(stderr, "FAIL %s:%d: %s returned %d, want %d (%s; op %s, path %s)\n", __FILE__,
                line, what, (int)got, (int)want, got ? str_or(e->message, "no message") : "ok",
                got ? str_or(e->op, "-") : "-", got ? str_or(e->path, "-") : "-");
    } else if (got != CC_OK && e->code != got) {
        failures++;
        fprintf(stderr, "FAIL %s:%d: %s: err.code %d differs from the result %d\n", __FILE__,
                line, what, (int)e->code, (int)got);
    }
    if (got != CC_OK)
        cc_error_free(e);
    return got == want;
}

/* A failing call whose error must carry `code`, `op` and `path`. */
static void expect_io(int line, cc_error_code got, const char *op, const char *path) {
    checks++;
    if (got != CC_ERR_IO || err.code != CC_ERR_IO || !err.op || !err.path ||
        strcmp(err.op, op) != 0 || strcmp(err.path, path) != 0 || !err.message) {
        failures++;
        fprintf(stderr, "FAIL %s:%d: want CC_ERR_IO op %s path %s; got %d op %s path %s (%s)\n",
                __FILE__, line, op, path, (int)got, str_or(err.op, "NULL"),
                str_or(err.path, "NULL"), str_or(err.message, "NULL"));
    }
    cc_error_free(&err);
}

static void expect_message(int line, cc_error_code got, cc_error_code want, const char *text) {
    checks++;
    if (got != want || !err.message || !strstr(err.message, text)) {
        failures++;
        fprintf(stderr, "FAIL %s:%d: want %d with \"%s\", got %d: %s\n", __FILE__, line, (int)want,
                text, (int)got, str_or(err.message, "NULL"));
    }
    cc_error_free(&err);
}

static char *make_temp_dir(const char *tag) {
    char *path = NULL;
    if (asprintf(&path, "/tmp/cc-capi-%s-%d-XXXXXX", tag, (int)getpid()) < 0)
        abort();
    if (!mkdtemp(path))
        abort();
    return path;
}

static void remove_tree(const char *path) {
    char *cmd = NULL;
    if (asprintf(&cmd, "rm -rf '%s'", path) < 0)
        abort();
    if (system(cmd) != 0)
        fprintf(stderr, "warning: could not remove %s\n", path);
    free(cmd);
}

static int path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* ---- without VMs ---- */

static void test_before_init(void) {
    expect_message(__LINE__, cc_cancel_token_new(&(cc_cancel_token){0}, &err),
                   CC_ERR_INVALID_ARGUMENT, "library not initialized: call cc_init");
    CHECK(strcmp(cc_api_version(), "0.1.0") == 0, "version %s", cc_api_version());
    CHECK(cc_api_version_compatible(CC_API_VERSION_MAJOR, CC_API_VERSION_MINOR), "own version");
    CHECK(cc_api_version_compatible(0, 0), "0.0");
    CHECK(!cc_api_version_compatible(0, CC_API_VERSION_MINOR + 1), "a newer minor");
    CHECK(!cc_api_version_compatible(CC_API_VERSION_MAJOR + 1, 0), "another major");
    CHECK(cc_guest_protocol_version() >= 1, "protocol %u", cc_guest_protocol_version());
}

static void test_library(void) {
    EXPECT(CC_OK, cc_init(&err));
    EXPECT(CC_OK, cc_init(NULL)); /* idempotent */
    /* Instances run here (under KVM or TCG), so the query succeeds. */
    cc_capabilities caps = CC_CAPABILITIES_INIT;
    CHECK(cc_supports_hypervisor(), "instances can run here");
    if (EXPECT(CC_OK, cc_query_capabilities(&caps, &err))) {
        CHECK(strcmp(caps.architecture, "x86_64") == 0, "arch %s", caps.architecture);
        CHECK(strcmp(caps.accelerator, caps.hardware_accelerated ? "kvm" : "tcg") == 0, "accel %s",
              caps.accelerator);
        CHECK(caps.hypervisor_available && caps.size == sizeof caps, "available, size kept");
        CHECK(caps.kernel_hash != NULL, "kernel hash is a string, maybe empty");
    }
    cc_capabilities unsized = {0};
    expect_message(__LINE__, cc_query_capabilities(&unsized, &err), CC_ERR_INVALID_ARGUMENT,
                   "`out->size` is 0");
}

static void test_null_arguments(void) {
    cc_source src = 0;
    expect_message(__LINE__, cc_source_from_dir(NULL, &src, &err), CC_ERR_INVALID_ARGUMENT,
                   "`path` is NULL");
    expect_message(__LINE__, cc_source_from_dir("/x", NULL, &err), CC_ERR_INVALID_ARGUMENT,
                   "`out` is NULL");
    expect_message(__LINE__, cc_query_capabilities(NULL, &err), CC_ERR_INVALID_ARGUMENT,
                   "`out` is NULL");
    expect_message(__LINE__, cc_instance_command(0, NULL, NULL, 0, NULL, &err),
                   CC_ERR_INVALID_ARGUMENT, "is NULL");
    expect_message(__LINE__, cc_oci_pull(0, NULL, NULL, NULL, NULL, 0, &src, &err),
                   CC_ERR_INVALID_ARGUMENT, "`reference` is NULL");
    const char *args[] = {"ok", NULL};
    expect_message(__LINE__, cc_instance_command(1, "echo", args, 2, &(cc_cmd){0}, &err),
                   CC_ERR_INVALID_ARGUMENT, "`args[1]` is NULL");
    expect_message(__LINE__, cc_source_from_dir("\xff\xfe", &src, &err), CC_ERR_INVALID_ARGUMENT,
                   "not valid UTF-8");
    CHECK(src == 0, "outputs untouched on failure");
    /* NULL `err` is always fine, and every free function takes NULL. */
    CHECK(cc_source_from_dir(NULL, &src, NULL) == CC_ERR_INVALID_ARGUMENT, "NULL err");
    cc_error_free(NULL);
    cc_string_free(NULL);
    cc_bytes_free(NULL);
    cc_strings_free(NULL, 0);
    cc_dir_entries_free(NULL, 0);
    cc_file_info_free(NULL);
    cc_image_config_free(NULL);
    cc_error zero = {0};
    cc_error_free(&zero);
    /* A zeroed cc_error (size 0) stands for the first version: it gets
     * every field, and cc_error_free leaves its size alone. */
    CHECK(cc_source_from_dir(NULL, &src, &zero) == CC_ERR_INVALID_ARGUMENT &&
              zero.code == CC_ERR_INVALID_ARGUMENT && zero.message != NULL && zero.size == 0,
          "size 0: the first version's fields written");
    cc_error_free(&zero);
    CHECK(zero.code == CC_OK && zero.message == NULL && zero.size == 0,
          "size 0: freed as the first version");
}

static void test_handles(void) {
    /* 0, never issued, freed, wrong kind. */
    expect_message(__LINE__, cc_instance_close(0, &err), CC_ERR_INVALID_HANDLE,
                   "0 is never a valid handle");
    expect_message(__LINE__, cc_instance_close(0x7fffffffffffULL, &err), CC_ERR_INVALID_HANDLE,
                   "freed or never issued");
    cc_cancel_token tok = 0;
    EXPECT(CC_OK, cc_cancel_token_new(&tok, &err));
    CHECK(tok != 0, "a handle");
    bool b = true;
    expect_message(__LINE__, cc_instance_is_running(tok, &b, &err), CC_ERR_INVALID_HANDLE,
                   "it is a cc_cancel_token");
    EXPECT(CC_ERR_INVALID_HANDLE, cc_cmd_start(tok, &err));
    EXPECT(CC_ERR_INVALID_HANDLE, cc_file_close(tok, &err));
    EXPECT(CC_ERR_INVALID_HANDLE, cc_conn_close(tok, &err));
    EXPECT(CC_ERR_INVALID_HANDLE, cc_snapshot_close(tok, &err));
    EXPECT(CC_ERR_INVALID_HANDLE, cc_oci_client_close(tok, &err));
    CHECK(cc_instance_free(tok) == CC_ERR_INVALID_HANDLE, "wrong-kind free");
    CHECK(cc_source_free(tok) == CC_ERR_INVALID_HANDLE, "wrong-kind free");
    /* The token survived all that. */
    EXPECT(CC_OK, cc_cancel_token_is_cancelled(tok, &b, &err));
    CHECK(!b, "not cancelled");
    EXPECT(CC_OK, cc_cancel_token_cancel(tok, &err));
    EXPECT(CC_OK, cc_cancel_token_cancel(tok, &err));
    EXPECT(CC_OK, cc_cancel_token_is_cancelled(tok, &b, &err));
    CHECK(b, "cancelled");
    CHECK(cc_cancel_token_free(tok) == CC_OK, "free");
    CHECK(cc_cancel_token_free(tok) == CC_ERR_INVALID_HANDLE, "double free");
    CHECK(cc_cancel_token_free(0) == CC_OK, "free 0");
    EXPECT(CC_ERR_INVALID_HANDLE, cc_cancel_token_cancel(tok, &err));
}

static void test_sources_and_clients(void) {
    char *store = make_temp_dir("store");
    cc_oci_client client = 0;
    EXPECT(CC_OK, cc_oci_client_new(store, &client, &err));
    cc_source src = 0;
    cc_error_code code = cc_oci_load_dir(client, "/nonexistent/layout", &src, &err);
    CHECK(code == CC_ERR_IO && err.message && strstr(err.message, "/nonexistent/layout"),
          "load_dir of a missing layout: %d %s", (int)code, str_or(err.message, "NULL"));
    cc_error_free(&err);
    code = cc_oci_load_tar(client, "/nonexistent/image.tar", &src, &err);
    CHECK(code == CC_ERR_IO, "load_tar of a missing file: %d %s", (int)code,
          str_or(err.message, "NULL"));
    cc_error_free(&err);
    /* Nothing listens on port 1: a registry failure is CC_ERR_NETWORK. */
    EXPECT(CC_ERR_NETWORK,
           cc_oci_pull(client, "127.0.0.1:1/nothing:1", NULL, NULL, NULL, 0, &src, &err));
    cc_pull_options opts = {0};
    opts.policy = 42;
    EXPECT(CC_ERR_INVALID_ARGUMENT,
           cc_oci_pull(client, "127.0.0.1:1/nothing:1", &opts, NULL, NULL, 0, &src, &err));
    opts.policy = CC_PULL_NEVER;
    opts.username = "user";
    expect_message(__LINE__,
                   cc_oci_pull(client, "127.0.0.1:1/x:1", &opts, NULL, NULL, 0, &src, &err),
                   CC_ERR_INVALID_ARGUMENT, "`options->password` is NULL");
    cc_cancel_token tok = 0;
    EXPECT(CC_OK, cc_cancel_token_new(&tok, &err));
    EXPECT(CC_OK, cc_cancel_token_cancel(tok, &err));
    EXPECT(CC_ERR_CANCELLED,
           cc_oci_pull(client, "127.0.0.1:1/nothing:1", NULL, NULL, NULL, tok, &src, &err));
    cc_cancel_token_free(tok);
    EXPECT(CC_OK, cc_oci_client_close(client, &err));
    EXPECT(CC_OK, cc_oci_client_close(client, &err)); /* double close */
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_oci_load_dir(client, "/x", &src, &err));
    CHECK(cc_oci_client_free(client) == CC_OK, "free client");
    CHECK(cc_oci_client_free(client) == CC_ERR_INVALID_HANDLE, "double free");

    /* A directory source has no image config; a missing mount source is an
     * I/O error found before anything boots. */
    EXPECT(CC_OK, cc_source_from_dir("/nonexistent/rootfs", &src, &err));
    cc_image_config *config = NULL;
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_source_image_config(src, &config, &err));
    CHECK(config == NULL, "untouched");
    cc_mount mount = {"/nonexistent/host/dir", "/mnt", false};
    cc_instance_options io = {0};
    expect_message(__LINE__, cc_instance_new(src, &io, &(cc_instance){0}, &err),
                   CC_ERR_INVALID_ARGUMENT, "`options->size` is 0");
    io = (cc_instance_options)CC_INSTANCE_OPTIONS_INIT;
    io.mounts = &mount;
    io.mount_count = 1;
    cc_instance inst = 0;
    code = cc_instance_new(src, &io, &inst, &err);
    CHECK(code == CC_ERR_IO && err.path && strcmp(err.path, "/nonexistent/host/dir") == 0,
          "missing mount source: %d %s", (int)code, str_or(err.message, "NULL"));
    cc_error_free(&err);
    io.mount_count = 0;
    io.timeout_seconds = -1;
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_new(src, &io, &inst, &err));
    io.timeout_seconds = 0;
    io.memory_mb = 1;
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_new(src, &io, &inst, &err));
    io.memory_mb = 0;
    /* A bad network rule is refused, naming it. */
    const char *rules[] = {"10.0.0.0/8", "1.2.3.4:70000"};
    io.net_deny = rules;
    io.net_deny_count = 2;
    code = cc_instance_new(src, &io, &inst, &err);
    CHECK(code == CC_ERR_INVALID_ARGUMENT && err.message && strstr(err.message, "1.2.3.4:70000"),
          "bad network rule: %d %s", (int)code, str_or(err.message, "NULL"));
    cc_error_free(&err);
    CHECK(inst == 0, "no instance");
    CHECK(cc_source_free(src) == CC_OK, "free source");
    remove_tree(store);
    free(store);
}

/* ---- with VMs ---- */

struct progress_seen {
    int calls;
    uint64_t last_current;
    uint64_t total;
    int monotonic;
    int blobs_ok;
    int cancel_after; /* return non-zero on this call (0 = never) */
};

static int on_progress(const cc_pull_progress *p, void *user_data) {
    struct progress_seen *s = user_data;
    s->calls++;
    if (p->current < s->last_current)
        s->monotonic = 0;
    if (!p->blob || strncmp(p->blob, "sha256:", 7) != 0 || p->blob_index >= p->blob_count)
        s->blobs_ok = 0;
    s->last_current = p->current;
    s->total = p->total;
    return s->cancel_after && s->calls >= s->cancel_after;
}

static int strings_contain(char **strings, size_t n, const char *want) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(strings[i], want) == 0)
            return 1;
    return 0;
}

static cc_source pull_image(const char *ref, char *store) {
    cc_oci_client client = 0;
    cc_source src = 0;
    EXPECT(CC_OK, cc_oci_client_new(store, &client, &err));

    /* A callback returning non-zero cancels. */
    struct progress_seen cancel = {0, 0, 0, 1, 1, 1};
    EXPECT(CC_ERR_CANCELLED, cc_oci_pull(client, ref, NULL, on_progress, &cancel, 0, &src, &err));
    CHECK(cancel.calls == 1, "no calls after cancelling: %d", cancel.calls);

    struct progress_seen seen = {0, 0, 0, 1, 1, 0};
    cc_pull_options opts = {0};
    opts.policy = CC_PULL_ALWAYS;
    opts.platform = "linux/amd64";
    EXPECT(CC_OK, cc_oci_pull(client, ref, &opts, on_progress, &seen, 0, &src, &err));
    CHECK(seen.calls > 0, "progress reported");
    CHECK(seen.monotonic, "progress is monotonic");
    CHECK(seen.blobs_ok, "blob digests and indexes");
    CHECK(seen.total > 0 && seen.last_current == seen.total, "ends complete: %llu/%llu",
          (unsigned long long)seen.last_current, (unsigned long long)seen.total);

    cc_image_config *c = NULL;
    if (EXPECT(CC_OK, cc_source_image_config(src, &c, &err))) {
        CHECK(strcmp(c->architecture, "amd64") == 0, "arch %s", c->architecture);
        CHECK(strcmp(c->os, "linux") == 0, "os %s", c->os);
        CHECK(strings_contain(c->env, c->env_count, "CC_IMAGE=busybox"), "image env");
        CHECK(c->env[c->env_count] == NULL, "NULL-terminated");
        CHECK(c->cmd_count == 1 && strcmp(c->cmd[0], "sh") == 0, "cmd");
        CHECK(c->entrypoint_count == 0, "no entrypoint");
        CHECK(c->label_count == 0 || c->label_keys[0] != NULL, "labels");
        cc_image_config_free(c);
    }

    char *out = make_temp_dir("export");
    EXPECT(CC_OK, cc_oci_export_dir(client, src, out, &err));
    char *index = NULL;
    if (asprintf(&index, "%s/index.json", out) < 0)
        abort();
    CHECK(path_exists(index), "exported %s", index);
    free(index);
    remove_tree(out);
    free(out);

    /* The client goes away; the source stays usable. */
    CHECK(cc_oci_client_free(client) == CC_OK, "free client");
    return src;
}

static void test_commands(cc_instance inst) {
    cc_cmd cmd = 0;
    uint8_t *data = NULL;
    size_t len = 0;
    int code = -100;

    const char *hello[] = {"hello"};
    EXPECT(CC_OK, cc_instance_command(inst, "echo", hello, 1, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_output(cmd, &data, &len, &code, &err));
    CHECK(len == 6 && memcmp(data, "hello\n", 6) == 0 && code == 0, "echo: %.*s %d", (int)len,
          (char *)data, code);
    free_bytes(&data);
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_start(cmd, &err)); /* started already */
    bool exited = false;
    EXPECT(CC_OK, cc_cmd_exit_code(cmd, &code, &exited, &err));
    CHECK(exited && code == 0, "exit code after output");
    cc_cmd_free(cmd);

    /* A non-zero status is CC_OK with the code. */
    const char *exit3[] = {"-c", "exit 3"};
    EXPECT(CC_OK, cc_instance_command(inst, "sh", exit3, 2, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_run(cmd, &code, &err));
    CHECK(code == 3, "exit 3: %d", code);
    cc_cmd_free(cmd);

    const char *both[] = {"-c", "echo out; echo err >&2"};
    EXPECT(CC_OK, cc_instance_command(inst, "sh", both, 2, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_combined_output(cmd, &data, &len, NULL, &err));
    CHECK(len == 8 && memcmp(data, "out\nerr\n", 8) == 0, "combined: %.*s", (int)len, (char *)data);
    free_bytes(&data);
    cc_cmd_free(cmd);

    /* Environment, directory, user. */
    const char *show[] = {"-c", "echo $FOO $CC_IMAGE; pwd; id -u"};
    EXPECT(CC_OK, cc_instance_command(inst, "sh", show, 2, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_set_env(cmd, "FOO", "bar", &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_set_env(cmd, "A=B", "x", &err));
    EXPECT(CC_OK, cc_cmd_set_dir(cmd, "/tmp", &err));
    EXPECT(CC_OK, cc_cmd_set_user(cmd, "alice", &err));
    char *value = NULL;
    EXPECT(CC_OK, cc_cmd_get_env(cmd, "FOO", &value, &err));
    CHECK(value && strcmp(value, "bar") == 0, "get_env FOO");
    cc_string_free(value);
    EXPECT(CC_OK, cc_cmd_get_env(cmd, "NOPE", &value, &err));
    CHECK(value == NULL, "unset is NULL");
    char **env = NULL;
    size_t n = 0;
    EXPECT(CC_OK, cc_cmd_environ(cmd, &env, &n, &err));
    CHECK(strings_contain(env, n, "FOO=bar") && strings_contain(env, n, "CC_IMAGE=busybox"),
          "environ has the image's and ours (%zu entries)", n);
    cc_strings_free(env, n);
    EXPECT(CC_OK, cc_cmd_output(cmd, &data, &len, &code, &err));
    CHECK(len == 22 && memcmp(data, "bar busybox\n/tmp\n1000\n", 22) == 0,
          "env, dir, user: %.*s", (int)len, (char *)data);
    free_bytes(&data);
    cc_cmd_free(cmd);

    /* A program that is not there is an I/O error. */
    EXPECT(CC_OK, cc_instance_command(inst, "no-such-program", NULL, 0, &cmd, &err));
    EXPECT(CC_ERR_IO, cc_cmd_run(cmd, &code, &err));
    cc_cmd_free(cmd);

    /* The image has no entrypoint: arguments replace its Cmd ["sh"]. */
    const char *ep[] = {"sh", "-c", "echo from-entrypoint"};
    EXPECT(CC_OK, cc_instance_entrypoint_command(inst, ep, 3, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_output(cmd, &data, &len, &code, &err));
    CHECK(len == 16 && memcmp(data, "from-entrypoint\n", 16) == 0, "entrypoint: %.*s", (int)len,
          (char *)data);
    free_bytes(&data);
    cc_cmd_free(cmd);
    EXPECT(CC_OK, cc_instance_entrypoint_command(inst, NULL, 0, &cmd, &err)); /* sh, no input */
    EXPECT(CC_OK, cc_cmd_run(cmd, &code, &err));
    CHECK(code == 0, "the image's Cmd: %d", code);
    cc_cmd_free(cmd);

    /* Time limit. */
    const char *ten[] = {"10"};
    EXPECT(CC_OK, cc_instance_command(inst, "sleep", ten, 1, &cmd, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_set_timeout(cmd, -1, &err));
    EXPECT(CC_OK, cc_cmd_set_timeout(cmd, 0.5, &err));
    EXPECT(CC_ERR_TIMEOUT, cc_cmd_run(cmd, &code, &err));
    cc_cmd_free(cmd);
}

static void test_pipes_and_kill(cc_instance inst) {
    cc_cmd cmd = 0;
    cc_conn in = 0, out = 0;
    int code = -100;
    size_t n = 0;

    EXPECT(CC_OK, cc_instance_command(inst, "cat", NULL, 0, &cmd, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_wait(cmd, &code, &err)); /* not started */
    EXPECT(CC_OK, cc_cmd_stdin_pipe(cmd, &in, &err));
    EXPECT(CC_OK, cc_cmd_stdout_pipe(cmd, &out, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_stdout_pipe(cmd, &out, &err)); /* twice */
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_conn_write(in, (const uint8_t *)"x", 1, &err));
    EXPECT(CC_OK, cc_cmd_start(cmd, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_conn_read(in, (uint8_t[4]){0}, 4, &n, &err));
    EXPECT(CC_OK, cc_conn_write(in, (const uint8_t *)"ping", 4, &err));
    EXPECT(CC_OK, cc_conn_write(in, (const uint8_t *)"-pong", 5, &err));
    EXPECT(CC_OK, cc_conn_close(in, &err)); /* end of file for cat */
    EXPECT(CC_OK, cc_conn_close(in, &err)); /* twice is fine */
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_conn_write(in, (const uint8_t *)"x", 1, &err));
    char got[64];
    size_t total = 0;
    for (;;) {
        if (!EXPECT(CC_OK, cc_conn_read(out, (uint8_t *)got + total, sizeof got - total, &n, &err)))
            break;
        if (n == 0)
            break; /* end of stream is CC_OK with 0 bytes */
        total += n;
    }
    CHECK(total == 9 && memcmp(got, "ping-pong", 9) == 0, "cat echoed %.*s", (int)total, got);
    EXPECT(CC_OK, cc_conn_read(out, (uint8_t *)got, sizeof got, &n, &err));
    CHECK(n == 0, "still at the end");
    EXPECT(CC_OK, cc_conn_read(out, NULL, 0, &n, &err));
    EXPECT(CC_OK, cc_cmd_wait(cmd, &code, &err));
    CHECK(code == 0, "cat exit %d", code);
    EXPECT(CC_OK, cc_cmd_wait(cmd, &code, &err)); /* again: same */
    CHECK(code == 0, "second wait");
    CHECK(cc_conn_free(in) == CC_OK && cc_conn_free(out) == CC_OK, "free conns");
    CHECK(cc_conn_free(in) == CC_ERR_INVALID_HANDLE, "double free");
    cc_cmd_free(cmd);

    /* stderr alone. */
    const char *oops[] = {"-c", "echo oops >&2"};
    cc_conn errpipe = 0;
    EXPECT(CC_OK, cc_instance_command(inst, "sh", oops, 2, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_stderr_pipe(cmd, &errpipe, &err));
    EXPECT(CC_OK, cc_cmd_start(cmd, &err));
    total = 0;
    do {
        n = 0;
        if (!EXPECT(CC_OK, cc_conn_read(errpipe, (uint8_t *)got + total, sizeof got - total, &n,
                                        &err)))
            break;
        total += n;
    } while (n > 0);
    CHECK(total == 5 && memcmp(got, "oops\n", 5) == 0, "stderr %.*s", (int)total, got);
    EXPECT(CC_OK, cc_cmd_wait(cmd, &code, &err));
    cc_conn_free(errpipe);
    cc_cmd_free(cmd);

    /* Kill. */
    const char *hundred[] = {"100"};
    bool exited = true;
    EXPECT(CC_OK, cc_instance_command(inst, "sleep", hundred, 1, &cmd, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_kill(cmd, &err)); /* not started */
    EXPECT(CC_OK, cc_cmd_exit_code(cmd, &code, &exited, &err));
    CHECK(!exited, "not exited before start");
    EXPECT(CC_OK, cc_cmd_start(cmd, &err));
    EXPECT(CC_OK, cc_cmd_kill(cmd, &err));
    EXPECT(CC_OK, cc_cmd_wait(cmd, &code, &err));
    CHECK(code == -9, "killed: %d", code);
    EXPECT(CC_OK, cc_cmd_exit_code(cmd, &code, &exited, &err));
    CHECK(exited && code == -9, "exit code -9");
    EXPECT(CC_OK, cc_cmd_kill(cmd, &err)); /* ended: fine */
    cc_cmd_free(cmd);
}

/* A command on a terminal: one output stream, TERM, resize, bad sizes. */
static void test_terminal(cc_instance inst) {
    cc_cmd cmd = 0;
    uint8_t *data = NULL;
    size_t len = 0;
    int code = -100;

    const char *script[] = {"-c", "echo $TERM; stty size; echo err >&2"};
    EXPECT(CC_OK, cc_instance_command(inst, "sh", script, 2, &cmd, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_set_pty(cmd, 0, 80, NULL, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_set_pty(cmd, 24, 5000, NULL, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_resize(cmd, 24, 80, &err)); /* no terminal */
    EXPECT(CC_OK, cc_cmd_set_pty(cmd, 24, 80, "vt100", &err));
    EXPECT(CC_OK, cc_cmd_output(cmd, &data, &len, &code, &err));
    const char *want = "vt100\r\n24 80\r\nerr\r\n";
    CHECK(code == 0 && len == strlen(want) && memcmp(data, want, len) == 0,
          "terminal output: %.*s %d", (int)len, (char *)data, code);
    free_bytes(&data);
    cc_cmd_free(cmd);

    /* Resized while it waits for a line. */
    const char *wait_then_size[] = {"-c", "read line; stty size"};
    cc_conn in = 0, out = 0;
    EXPECT(CC_OK, cc_instance_command(inst, "sh", wait_then_size, 2, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_set_pty(cmd, 24, 80, NULL, &err));
    EXPECT(CC_OK, cc_cmd_stdin_pipe(cmd, &in, &err));
    EXPECT(CC_OK, cc_cmd_stdout_pipe(cmd, &out, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_resize(cmd, 30, 100, &err)); /* not started */
    EXPECT(CC_OK, cc_cmd_start(cmd, &err));
    EXPECT(CC_OK, cc_cmd_resize(cmd, 30, 100, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_cmd_resize(cmd, 30, 0, &err));
    EXPECT(CC_OK, cc_conn_write(in, (const uint8_t *)"\n", 1, &err));
    EXPECT(CC_OK, cc_conn_read_all(out, &data, &len, &err));
    CHECK(data && memmem(data, len, "30 100", 6), "resized: %.*s", (int)len, (char *)data);
    free_bytes(&data);
    EXPECT(CC_OK, cc_cmd_wait(cmd, &code, &err));
    CHECK(code == 0, "exit %d", code);
    EXPECT(CC_OK, cc_cmd_resize(cmd, 30, 100, &err)); /* ended: fine */
    cc_conn_free(in);
    cc_conn_free(out);
    cc_cmd_free(cmd);
}

/* Runs a shell script in the guest; whether it exited 0. */
static int sh_ok(cc_instance inst, const char *script) {
    const char *args[] = {"-c", script};
    cc_cmd cmd = 0;
    int code = -1;
    EXPECT(CC_OK, cc_instance_command(inst, "sh", args, 2, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_run(cmd, &code, &err));
    cc_cmd_free(cmd);
    return code == 0;
}

/* A failing guest call whose error carries CC_ERR_IO and the guest errno. */
static void expect_errno(int line, cc_error_code got, int want) {
    checks++;
    if (got != CC_ERR_IO || err.os_errno != want) {
        failures++;
        fprintf(stderr, "FAIL %s:%d: want CC_ERR_IO errno %d (%s); got %d errno %d (%s)\n",
                __FILE__, line, want, strerror(want), (int)got, err.os_errno,
                str_or(err.message, "NULL"));
    }
    cc_error_free(&err);
    CHECK(err.os_errno == 0, "os_errno reset by cc_error_free");
}

/* Guest file operations report the guest's errno. */
static void test_errnos(cc_instance inst) {
    uint8_t *data = NULL;
    size_t len = 0;
    expect_errno(__LINE__, cc_instance_read_file(inst, "/no/such/file", &data, &len, &err), ENOENT);
    expect_errno(__LINE__, cc_instance_mkdir(inst, "/tmp", 0755, &err), EEXIST);
    expect_errno(__LINE__, cc_instance_write_file(inst, "/etc/passwd/x", (const uint8_t *)"x", 1,
                                                  0644, &err),
                 ENOTDIR);
    expect_errno(__LINE__, cc_instance_read_file(inst, "/tmp", &data, &len, &err), EISDIR);
    /* A read-only sysctl: refused even to the guest's root. */
    expect_errno(__LINE__, cc_instance_write_file(inst, "/proc/sys/kernel/ostype",
                                                  (const uint8_t *)"x", 1, 0644, &err),
                 EACCES);
    /* A full filesystem: a 64 KiB tmpfs. */
    CHECK(sh_ok(inst, "mkdir -p /tmp/full && mount -t tmpfs -o size=64k tmpfs /tmp/full"),
          "mount a small tmpfs");
    static uint8_t big[1 << 20];
    expect_errno(__LINE__,
                 cc_instance_write_file(inst, "/tmp/full/f", big, sizeof big, 0644, &err), ENOSPC);
    CHECK(sh_ok(inst, "umount /tmp/full && rmdir /tmp/full"), "unmount it");
    CHECK(data == NULL, "no output on failure");
}

static void test_files(cc_instance inst) {
    const char *text = "hello file";
    uint8_t *data = NULL;
    size_t len = 0;
    cc_file_info info;

    EXPECT(CC_OK, cc_instance_write_file(inst, "/tmp/hello.txt", (const uint8_t *)text, 10, 0640,
                                         &err));
    EXPECT(CC_OK, cc_instance_read_file(inst, "/tmp/hello.txt", &data, &len, &err));
    CHECK(len == 10 && memcmp(data, text, 10) == 0, "round trip");
    free_bytes(&data);
    EXPECT(CC_OK, cc_instance_write_file(inst, "/tmp/empty", NULL, 0, 0600, &err));
    EXPECT(CC_OK, cc_instance_read_file(inst, "/tmp/empty", &data, &len, &err));
    CHECK(len == 0 && data != NULL, "empty file: non-NULL buffer");
    free_bytes(&data);

    if (EXPECT(CC_OK, cc_instance_stat(inst, "/tmp/hello.txt", &info, &err))) {
        CHECK(strcmp(info.name, "hello.txt") == 0 && info.size == 10 &&
                  (info.mode & 0777) == 0640 && !info.is_dir && !info.is_symlink &&
                  info.mtime_unix > 1600000000 && info.mtime_nsec < 1000000000,
              "stat: %s %llu %o", info.name, (unsigned long long)info.size, info.mode);
        cc_file_info_free(&info);
        CHECK(info.name == NULL, "name freed");
        cc_file_info_free(&info); /* twice is fine */
    }

    EXPECT(CC_OK, cc_instance_mkdir(inst, "/tmp/d", 0755, &err));
    EXPECT(CC_ERR_IO, cc_instance_mkdir(inst, "/tmp/d", 0755, &err)); /* exists */
    test_errnos(inst);
    EXPECT(CC_OK, cc_instance_mkdir_all(inst, "/tmp/d/e/f", 0755, &err));
    EXPECT(CC_OK, cc_instance_rename(inst, "/tmp/hello.txt", "/tmp/d/h.txt", &err));
    EXPECT(CC_OK, cc_instance_symlink(inst, "h.txt", "/tmp/d/link", &err));
    char *target = NULL;
    EXPECT(CC_OK, cc_instance_readlink(inst, "/tmp/d/link", &target, &err));
    CHECK(target && strcmp(target, "h.txt") == 0, "readlink %s", str_or(target, "NULL"));
    cc_string_free(target);
    if (EXPECT(CC_OK, cc_instance_lstat(inst, "/tmp/d/link", &info, &err))) {
        CHECK(info.is_symlink, "lstat sees the link");
        cc_file_info_free(&info);
    }
    if (EXPECT(CC_OK, cc_instance_stat(inst, "/tmp/d/link", &info, &err))) {
        CHECK(!info.is_symlink && info.size == 10, "stat follows it");
        cc_file_info_free(&info);
    }
    EXPECT(CC_OK, cc_instance_chmod(inst, "/tmp/d/h.txt", 0600, &err));
    EXPECT(CC_OK, cc_instance_chown(inst, "/tmp/d/h.txt", 1000, -1, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_chown(inst, "/tmp/d/h.txt", -2, -1, &err));
    EXPECT(CC_OK, cc_instance_chtimes(inst, "/tmp/d/h.txt", 1000000000, 0, 1234567890, 500, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT,
           cc_instance_chtimes(inst, "/tmp/d/h.txt", 0, 1000000000, 0, 0, &err));
    if (EXPECT(CC_OK, cc_instance_stat(inst, "/tmp/d/h.txt", &info, &err))) {
        CHECK((info.mode & 0777) == 0600 && info.uid == 1000 && info.gid == 0 &&
                  info.mtime_unix == 1234567890 && info.mtime_nsec == 500,
              "metadata: %o %u:%u %lld.%u", info.mode, info.uid, info.gid,
              (long long)info.mtime_unix, info.mtime_nsec);
        cc_file_info_free(&info);
    }

    cc_dir_entry *entries = NULL;
    size_t count = 0;
    if (EXPECT(CC_OK, cc_instance_read_dir(inst, "/tmp/d", &entries, &count, &err))) {
        CHECK(count == 3 && strcmp(entries[0].name, "e") == 0 && entries[0].is_dir &&
                  strcmp(entries[1].name, "h.txt") == 0 && !entries[1].is_dir &&
                  strcmp(entries[2].name, "link") == 0 && (entries[2].mode & 0170000) == 0120000,
              "read_dir: %zu entries", count);
        cc_dir_entries_free(entries, count);
    }

    /* The error path: missing files are CC_ERR_IO with op and path. */
    expect_io(__LINE__, cc_instance_remove(inst, "/tmp/nope", &err), "remove", "/tmp/nope");
    expect_io(__LINE__, cc_instance_stat(inst, "/tmp/nope", &info, &err), "stat", "/tmp/nope");
    expect_io(__LINE__, cc_instance_read_file(inst, "/tmp/nope", &data, &len, &err), "read_file",
              "/tmp/nope");
    expect_io(__LINE__, cc_instance_read_dir(inst, "/tmp/nope", &entries, &count, &err),
              "read_dir", "/tmp/nope");
    EXPECT(CC_ERR_IO, cc_instance_remove(inst, "/tmp/d", &err)); /* not empty */
    EXPECT(CC_OK, cc_instance_remove(inst, "/tmp/d/link", &err));
    EXPECT(CC_OK, cc_instance_remove_all(inst, "/tmp/d", &err));
    EXPECT(CC_OK, cc_instance_remove_all(inst, "/tmp/d", &err)); /* missing is fine */
    EXPECT(CC_ERR_IO, cc_instance_stat(inst, "/tmp/d", &info, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_stat(inst, "", &info, &err));
}

static void test_file_handles(cc_instance inst) {
    cc_file f = 0;
    size_t n = 0;
    uint64_t off = 99;
    char buf[16];
    cc_file_info info;

    EXPECT(CC_OK, cc_instance_create(inst, "/tmp/f.bin", &f, &err));
    EXPECT(CC_OK, cc_file_write(f, (const uint8_t *)"0123456789", 10, &n, &err));
    CHECK(n == 10, "written %zu", n);
    EXPECT(CC_OK, cc_file_seek(f, 0, CC_SEEK_SET, &off, &err));
    CHECK(off == 0, "seek set");
    EXPECT(CC_OK, cc_file_read(f, (uint8_t *)buf, 4, &n, &err));
    CHECK(n == 4 && memcmp(buf, "0123", 4) == 0, "read 4");
    EXPECT(CC_OK, cc_file_seek(f, -2, CC_SEEK_END, &off, &err));
    CHECK(off == 8, "seek end: %llu", (unsigned long long)off);
    EXPECT(CC_OK, cc_file_read(f, (uint8_t *)buf, sizeof buf, &n, &err));
    CHECK(n == 2 && memcmp(buf, "89", 2) == 0, "read tail");
    EXPECT(CC_OK, cc_file_read(f, (uint8_t *)buf, sizeof buf, &n, &err));
    CHECK(n == 0, "EOF is CC_OK with 0 bytes");
    EXPECT(CC_OK, cc_file_seek(f, -3, CC_SEEK_CUR, NULL, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_file_seek(f, 0, 7, NULL, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_file_seek(f, -1, CC_SEEK_SET, NULL, &err));
    if (EXPECT(CC_OK, cc_file_stat(f, &info, &err))) {
        CHECK(info.size == 10 && strcmp(info.name, "f.bin") == 0, "fstat");
        cc_file_info_free(&info);
    }
    EXPECT(CC_OK, cc_file_truncate(f, 5, &err));
    EXPECT(CC_OK, cc_file_sync(f, &err));
    EXPECT(CC_OK, cc_file_close(f, &err));
    EXPECT(CC_OK, cc_file_close(f, &err)); /* double close */
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_file_read(f, (uint8_t *)buf, sizeof buf, &n, &err));
    CHECK(cc_file_free(f) == CC_OK, "free");
    CHECK(cc_file_free(f) == CC_ERR_INVALID_HANDLE, "double free");

    EXPECT(CC_OK, cc_instance_open_file(inst, "/tmp/f.bin", CC_O_WRONLY | CC_O_APPEND, 0, &f, &err));
    EXPECT(CC_OK, cc_file_write(f, (const uint8_t *)"XY", 2, NULL, &err));
    cc_file_free(f); /* closes */
    uint8_t *data = NULL;
    size_t len = 0;
    EXPECT(CC_OK, cc_instance_read_file(inst, "/tmp/f.bin", &data, &len, &err));
    CHECK(len == 7 && memcmp(data, "01234XY", 7) == 0, "append: %.*s", (int)len, (char *)data);
    free_bytes(&data);

    EXPECT(CC_OK, cc_instance_open(inst, "/tmp/f.bin", &f, &err));
    EXPECT(CC_ERR_IO, cc_file_write(f, (const uint8_t *)"no", 2, NULL, &err)); /* read-only */
    cc_file_free(f);
    expect_io(__LINE__, cc_instance_open(inst, "/tmp/missing", &f, &err), "open", "/tmp/missing");
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_open_file(inst, "/tmp/x", 3, 0, &f, &err));
    EXPECT(CC_ERR_IO, cc_instance_open_file(inst, "/tmp/f.bin", CC_O_CREATE | CC_O_EXCL | CC_O_RDWR,
                                            0600, &f, &err));
}

struct canceller {
    cc_cancel_token token;
};

static void *cancel_later(void *arg) {
    struct canceller *c = arg;
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    cc_cancel_token_cancel(c->token, NULL);
    return NULL;
}

static cc_error_code shutdown_result = CC_ERR_UNKNOWN;

static void *shutdown_later(void *arg) {
    (void)arg;
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    shutdown_result = cc_shutdown(NULL);
    return NULL;
}

static void test_wait_cancel(cc_instance inst) {
    struct canceller c = {0};
    EXPECT(CC_OK, cc_cancel_token_new(&c.token, &err));
    pthread_t thread;
    pthread_create(&thread, NULL, cancel_later, &c);
    expect_message(__LINE__, cc_instance_wait(inst, c.token, &err), CC_ERR_CANCELLED,
                   "wait cancelled");
    pthread_join(thread, NULL);
    cc_cancel_token_free(c.token);
    /* A freed token is a bad handle, not "no token". */
    EXPECT(CC_ERR_INVALID_HANDLE, cc_instance_wait(inst, c.token, &err));
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void test_pause(cc_instance inst) {
    bool paused = true;
    EXPECT(CC_OK, cc_instance_is_paused(inst, &paused, &err));
    CHECK(!paused, "not paused after boot");
    EXPECT(CC_OK, cc_instance_pause(inst, &err));
    EXPECT(CC_OK, cc_instance_pause(inst, &err)); /* idempotent */
    EXPECT(CC_OK, cc_instance_is_paused(inst, &paused, &err));
    CHECK(paused, "paused");
    bool running = false;
    EXPECT(CC_OK, cc_instance_is_running(inst, &running, &err));
    CHECK(running, "a paused instance is running");
    cc_cmd cmd = 0;
    EXPECT(CC_OK, cc_instance_command(inst, "true", NULL, 0, &cmd, &err));
    double t = now_seconds();
    expect_message(__LINE__, cc_cmd_run(cmd, NULL, &err), CC_ERR_PAUSED, "paused");
    CHECK(now_seconds() - t < 2.0, "a request while paused fails at once, not a hang");
    cc_cmd_free(cmd);
    EXPECT(CC_OK, cc_instance_resume(inst, &err));
    EXPECT(CC_OK, cc_instance_resume(inst, &err)); /* idempotent */
    EXPECT(CC_OK, cc_instance_is_paused(inst, &paused, &err));
    CHECK(!paused, "resumed");
    int code = -1;
    EXPECT(CC_OK, cc_instance_command(inst, "true", NULL, 0, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_run(cmd, &code, &err));
    CHECK(code == 0, "a command after resume: %d", code);
    cc_cmd_free(cmd);
}

static void test_snapshot(cc_instance inst, const char *cache) {
    (void)cache;
    EXPECT(CC_OK, cc_instance_write_file(inst, "/root/snap.txt", (const uint8_t *)"snap", 4, 0644,
                                         &err));
    EXPECT(CC_OK, cc_instance_write_file(inst, "/root/skip.log", (const uint8_t *)"x", 1, 0644,
                                         &err));
    const char *excludes[] = {"*.log"};
    cc_snapshot snap = 0;
    EXPECT(CC_OK, cc_instance_snapshot(inst, excludes, 1, &snap, &err));
    char *name = NULL;
    EXPECT(CC_OK, cc_snapshot_name(snap, &name, &err));
    CHECK(name && strncmp(name, "localhost/cc-snapshots:", 23) == 0, "name %s",
          str_or(name, "NULL"));
    cc_string_free(name);
    cc_source src = 0;
    EXPECT(CC_OK, cc_snapshot_as_source(snap, &src, &err));
    char *out = make_temp_dir("snapshot");
    EXPECT(CC_OK, cc_snapshot_export_dir(snap, out, &err));
    remove_tree(out);
    free(out);
    EXPECT(CC_OK, cc_snapshot_close(snap, &err));
    EXPECT(CC_OK, cc_snapshot_close(snap, &err)); /* double close */
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_snapshot_as_source(snap, &src, &err));
    CHECK(cc_snapshot_free(snap) == CC_OK, "free");
    CHECK(cc_snapshot_free(snap) == CC_ERR_INVALID_HANDLE, "double free");

    /* A new instance from the snapshot has the file (and not the excluded
     * one); it ends when its guest powers off. */
    cc_instance_options opts = CC_INSTANCE_OPTIONS_INIT;
    opts.memory_mb = 256;
    opts.timeout_seconds = 300;
    cc_instance second = 0;
    if (!EXPECT(CC_OK, cc_instance_new(src, &opts, &second, &err))) {
        cc_source_free(src);
        return;
    }
    cc_source_free(src);
    uint8_t *data = NULL;
    size_t len = 0;
    EXPECT(CC_OK, cc_instance_read_file(second, "/root/snap.txt", &data, &len, &err));
    CHECK(len == 4 && memcmp(data, "snap", 4) == 0, "the snapshot has the file");
    free_bytes(&data);
    EXPECT(CC_ERR_IO, cc_instance_read_file(second, "/root/skip.log", &data, &len, &err));

    cc_cmd cmd = 0;
    EXPECT(CC_OK, cc_instance_command(second, "poweroff", NULL, 0, &cmd, &err));
    cc_cmd_start(cmd, NULL); /* the guest may go before answering */
    cc_cmd_free(cmd);
    EXPECT(CC_OK, cc_instance_wait(second, 0, &err));
    /* QEMU has exited; the instance notices when its channel closes, a
     * moment later at most. */
    bool running = true;
    for (int i = 0; i < 100 && running; i++) {
        EXPECT(CC_OK, cc_instance_is_running(second, &running, &err));
        if (running)
            nanosleep(&(struct timespec){0, 50 * 1000 * 1000}, NULL);
    }
    CHECK(!running, "powered off");
    EXPECT(CC_OK, cc_instance_command(second, "true", NULL, 0, &cmd, &err));
    EXPECT(CC_ERR_NOT_RUNNING, cc_cmd_run(cmd, NULL, &err));
    cc_cmd_free(cmd);

    EXPECT(CC_OK, cc_instance_close(second, &err));
    EXPECT(CC_OK, cc_instance_close(second, &err)); /* double close */
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_instance_wait(second, 0, &err));
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_instance_read_file(second, "/x", &data, &len, &err));
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_instance_command(second, "true", NULL, 0, &cmd, &err));
    char *id = NULL;
    EXPECT(CC_OK, cc_instance_id(second, &id, &err)); /* still has its id */
    cc_string_free(id);
    CHECK(cc_instance_free(second) == CC_OK, "free");
    CHECK(cc_instance_free(second) == CC_ERR_INVALID_HANDLE, "double free");
}

static void test_mounts(cc_source src) {
    char *host = make_temp_dir("mount");
    char *file = NULL;
    if (asprintf(&file, "%s/hello.txt", host) < 0)
        abort();
    FILE *f = fopen(file, "w");
    fputs("from the host", f);
    fclose(f);
    cc_mount mount = {host, "/mnt/host", false};
    cc_instance_options opts = CC_INSTANCE_OPTIONS_INIT;
    opts.memory_mb = 256;
    opts.mounts = &mount;
    opts.mount_count = 1;
    cc_instance inst = 0;
    if (EXPECT(CC_OK, cc_instance_new(src, &opts, &inst, &err))) {
        uint8_t *data = NULL;
        size_t len = 0;
        EXPECT(CC_OK, cc_instance_read_file(inst, "/mnt/host/hello.txt", &data, &len, &err));
        CHECK(len == 13 && memcmp(data, "from the host", 13) == 0, "mounted file");
        free_bytes(&data);
        EXPECT(CC_ERR_IO, cc_instance_write_file(inst, "/mnt/host/new", (const uint8_t *)"x", 1,
                                                 0644, &err)); /* read-only */
        cc_instance_free(inst);
    }
    remove_tree(host);
    free(host);
    free(file);
}

/* Reads `c` to its end into `buf` (NUL-terminated); returns the length. */
static size_t read_conn(cc_conn c, char *buf, size_t cap) {
    size_t total = 0, n = 0;
    do {
        n = 0;
        if (!EXPECT(CC_OK, cc_conn_read(c, (uint8_t *)buf + total, cap - 1 - total, &n, &err)))
            break;
        total += n;
    } while (n > 0 && total < cap - 1);
    buf[total] = 0;
    return total;
}

/* Starts `sh -c script` in the guest. */
static cc_cmd start_sh(cc_instance inst, const char *script) {
    const char *args[] = {"-c", script};
    cc_cmd cmd = 0;
    EXPECT(CC_OK, cc_instance_command(inst, "sh", args, 2, &cmd, &err));
    EXPECT(CC_OK, cc_cmd_start(cmd, &err));
    return cmd;
}

static void test_network(cc_instance inst) {
    cc_listener l = 0;
    cc_conn c = 0;
    int code = -1;
    char buf[256];
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_listen(inst, "udp", ":80", &l, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_listen(inst, "tcp", ":65536", &l, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_listen(inst, "tcp", "nowhere", &l, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_listen(inst, "tcp", NULL, &l, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_listen(inst, "tcp", ":0", NULL, &err));
    EXPECT(CC_ERR_INVALID_HANDLE, cc_listener_accept(inst, 0, &c, &err)); /* wrong kind */

    /* A guest program connects to host.internal. */
    EXPECT(CC_OK, cc_instance_listen(inst, "tcp", ":0", &l, &err));
    char *addr = NULL;
    uint16_t port = 0;
    EXPECT(CC_OK, cc_listener_addr(l, &addr, &port, &err));
    CHECK(port > 0 && addr && strncmp(addr, "host.internal:", 14) == 0, "listener addr %s",
          str_or(addr, "NULL"));
    cc_string_free(addr);
    char script[128];
    snprintf(script, sizeof script, "echo from-guest | nc host.internal %u", (unsigned)port);
    cc_cmd nc = start_sh(inst, script);
    EXPECT(CC_OK, cc_listener_accept(l, 0, &c, &err));
    char *local = NULL, *remote = NULL;
    EXPECT(CC_OK, cc_conn_addrs(c, &local, &remote, &err));
    CHECK(local && remote && strncmp(local, "127.0.0.254:", 12) == 0, "addrs %s %s",
          str_or(local, "NULL"), str_or(remote, "NULL"));
    cc_string_free(local);
    cc_string_free(remote);
    CHECK(read_conn(c, buf, sizeof buf) == 11 && strcmp(buf, "from-guest\n") == 0, "got %s", buf);
    EXPECT(CC_OK, cc_conn_write(c, (const uint8_t *)"bye", 3, &err));
    EXPECT(CC_OK, cc_conn_close_write(c, &err));
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_conn_write(c, (const uint8_t *)"x", 1, &err));
    EXPECT(CC_OK, cc_cmd_wait(nc, &code, &err));
    CHECK(code == 0, "guest nc exit %d", code);
    cc_cmd_free(nc);
    CHECK(cc_conn_free(c) == CC_OK, "free conn");

    /* A cancelled accept, then a closed listener. */
    cc_cancel_token token = 0;
    EXPECT(CC_OK, cc_cancel_token_new(&token, &err));
    EXPECT(CC_OK, cc_cancel_token_cancel(token, &err));
    EXPECT(CC_ERR_CANCELLED, cc_listener_accept(l, token, &c, &err));
    cc_cancel_token_free(token);
    EXPECT(CC_OK, cc_listener_close(l, &err));
    EXPECT(CC_OK, cc_listener_close(l, &err));
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_listener_accept(l, 0, &c, &err));
    CHECK(cc_listener_free(l) == CC_OK && cc_listener_free(l) == CC_ERR_INVALID_HANDLE,
          "free listener");

    /* Dial a guest service; a pipe has no addresses. */
    nc = start_sh(inst, "echo hi | nc -l -p 7100");
    cc_error_code got = CC_ERR_NETWORK;
    for (int i = 0; i < 400 && got == CC_ERR_NETWORK; i++) {
        got = cc_instance_dial(inst, "tcp", "127.0.0.1:7100", &c, &err);
        if (got == CC_ERR_NETWORK) {
            cc_error_free(&err);
            usleep(50000);
        }
    }
    if (EXPECT(CC_OK, got)) {
        CHECK(read_conn(c, buf, sizeof buf) == 3 && strcmp(buf, "hi\n") == 0, "dial got %s", buf);
        cc_conn_free(c);
    }
    EXPECT(CC_OK, cc_cmd_wait(nc, &code, &err));
    cc_cmd_free(nc);
    expect_message(__LINE__, cc_instance_dial(inst, "tcp", ":7100", &c, &err), CC_ERR_NETWORK,
                   "127.0.0.1:7100");

    /* Expose a guest port on the host's loopback. */
    nc = start_sh(inst, "echo exposed | nc -l -p 7101");
    cc_exposed e = 0;
    uint16_t host_port = 0, again = 0;
    EXPECT(CC_OK, cc_instance_expose(inst, 7101, 0, &e, &host_port, &err));
    EXPECT(CC_OK, cc_exposed_port(e, &again, &err));
    CHECK(host_port > 0 && again == host_port, "exposed at %u", (unsigned)host_port);
    cc_exposed other = 0;
    expect_message(__LINE__, cc_instance_expose(inst, 7101, 0, &other, NULL, &err),
                   CC_ERR_INVALID_ARGUMENT, "already exposed");
    size_t total = 0;
    for (int i = 0; i < 400 && total == 0; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(host_port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) {
            ssize_t r;
            while ((r = read(s, buf + total, sizeof buf - 1 - total)) > 0)
                total += (size_t)r;
        }
        close(s);
        if (total == 0)
            usleep(50000); /* nc not listening yet */
    }
    buf[total] = 0;
    CHECK(strcmp(buf, "exposed\n") == 0, "host client got %s", buf);
    EXPECT(CC_OK, cc_cmd_wait(nc, &code, &err));
    cc_cmd_free(nc);
    EXPECT(CC_OK, cc_exposed_close(e, &err));
    EXPECT(CC_OK, cc_exposed_close(e, &err));
    CHECK(cc_exposed_free(e) == CC_OK && cc_exposed_free(e) == CC_ERR_INVALID_HANDLE,
          "free exposed");
}

/* A second start of the same configuration is warm; no_warm_start is cold. */
static void test_warm_start(cc_source src, cc_instance_options opts) {
    for (int cold = 0; cold < 2; cold++) {
        opts.no_warm_start = cold;
        cc_instance inst = 0;
        if (!EXPECT(CC_OK, cc_instance_new(src, &opts, &inst, &err)))
            continue;
        cc_start_kind kind = (cc_start_kind)99;
        EXPECT(CC_OK, cc_instance_start_kind(inst, &kind, &err));
        CHECK(kind == (cold ? CC_START_COLD : CC_START_WARM), "start kind %d (cold %d)", (int)kind,
              cold);
        EXPECT(CC_OK, cc_instance_close(inst, &err));
        EXPECT(CC_OK, cc_instance_start_kind(inst, &kind, &err)); /* closed: still known */
        cc_instance_free(inst);
    }
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_start_kind(src, NULL, &err));
}

/* Park a running instance and restore it twice from the same park; branch
 * another into two. */
static void test_park(cc_source src, cc_instance_options opts) {
    cc_instance inst = 0;
    if (!EXPECT(CC_OK, cc_instance_new(src, &opts, &inst, &err)))
        return;
    char *dir = make_temp_dir("park");
    char park[512];
    snprintf(park, sizeof park, "%s/p", dir);
    CHECK(sh_ok(inst, "echo kept > /etc/marker"), "write before the park");
    uint64_t bytes = 0;
    EXPECT(CC_OK, cc_instance_park(inst, park, &bytes, &err));
    CHECK(bytes > 0, "park of %llu bytes", (unsigned long long)bytes);
    EXPECT(CC_ERR_ALREADY_CLOSED, cc_instance_park(inst, park, NULL, &err));
    cc_instance_free(inst);
    for (int i = 0; i < 2; i++) {
        cc_instance back = 0;
        if (!EXPECT(CC_OK, cc_instance_restore(park, 0, &back, &err)))
            continue;
        cc_start_kind kind = (cc_start_kind)99;
        EXPECT(CC_OK, cc_instance_start_kind(back, &kind, &err));
        CHECK(kind == CC_START_RESTORED, "start kind %d", (int)kind);
        CHECK(sh_ok(back, "test \"$(cat /etc/marker)\" = kept"), "the file came back");
        cc_instance_free(back);
    }
    cc_instance none = 0;
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_restore(dir, 0, &none, &err));
    remove_tree(dir);
    free(dir);

    /* A branch: two running copies, the source running on. */
    cc_instance orig = 0, kids[2] = {0, 0};
    if (!EXPECT(CC_OK, cc_instance_new(src, &opts, &orig, &err)))
        return;
    CHECK(sh_ok(orig, "echo branched > /etc/marker"), "write before the branch");
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_branch(orig, 0, kids, &err));
    EXPECT(CC_ERR_INVALID_ARGUMENT, cc_instance_branch(orig, 2, NULL, &err));
    if (EXPECT(CC_OK, cc_instance_branch(orig, 2, kids, &err))) {
        CHECK(kids[0] != 0 && kids[1] != 0 && kids[0] != kids[1], "two children");
        for (int i = 0; i < 2; i++) {
            CHECK(sh_ok(kids[i], "test \"$(cat /etc/marker)\" = branched"), "child %d's file", i);
            cc_instance_free(kids[i]);
        }
    }
    CHECK(sh_ok(orig, "true"), "the source runs on");
    cc_instance_free(orig);
}

/* Results are the library's buffer (moved out with cc_bytes_move), capped
 * by max_result_bytes; data of any size streams in constant memory. */
static void test_streaming_and_caps(cc_source src, cc_instance_options opts) {
    opts.max_result_bytes = 1 << 20;
    cc_instance inst = 0;
    if (!EXPECT(CC_OK, cc_instance_new(src, &opts, &inst, &err)))
        return;
    char *dir = make_temp_dir("stream");
    char host_in[512], host_out[512];
    snprintf(host_in, sizeof host_in, "%s/in", dir);
    snprintf(host_out, sizeof host_out, "%s/out", dir);
    size_t size = 3 << 20;
    uint8_t *pattern = malloc(size);
    for (size_t i = 0; i < size; i++)
        pattern[i] = (uint8_t)(i * 7 + i / 4096);
    FILE *fp = fopen(host_in, "wb");
    CHECK(fp && fwrite(pattern, 1, size, fp) == size, "write %s", host_in);
    if (fp)
        fclose(fp);

    uint64_t copied = 0;
    EXPECT(CC_OK, cc_instance_copy_in(inst, host_in, "/big", 0600, &copied, &err));
    CHECK(copied == size, "copy_in: %llu", (unsigned long long)copied);
    uint8_t *data = NULL;
    size_t len = 0;
    expect_message(__LINE__, cc_instance_read_file(inst, "/big", &data, &len, &err),
                   CC_ERR_TOO_LARGE, "3145728 bytes, over max_result_bytes (1048576)");
    EXPECT(CC_OK, cc_instance_copy_out(inst, "/big", host_out, &copied, &err));
    CHECK(copied == size, "copy_out: %llu", (unsigned long long)copied);
    fp = fopen(host_out, "rb");
    uint8_t *back = malloc(size + 1);
    CHECK(fp && fread(back, 1, size + 1, fp) == size && memcmp(back, pattern, size) == 0,
          "copy_out wrote what copy_in read");
    if (fp)
        fclose(fp);

    cc_conn stream = 0;
    uint64_t reported = 0;
    size_t got = 0, n = 0;
    EXPECT(CC_OK, cc_instance_read_file_stream(inst, "/big", &stream, &reported, &err));
    CHECK(reported == size, "reported size %llu", (unsigned long long)reported);
    while (got <= size && EXPECT(CC_OK, cc_conn_read(stream, back + got, size + 1 - got, &n, &err)) &&
           n > 0)
        got += n;
    CHECK(got == size && memcmp(back, pattern, size) == 0, "streamed %zu bytes", got);
    cc_conn_free(stream);

    /* Under the cap: the library's buffer, moved into ours. */
    EXPECT(CC_OK, cc_instance_write_file(inst, "/small", pattern, 1000, 0600, &err));
    if (EXPECT(CC_OK, cc_instance_read_file(inst, "/small", &data, &len, &err))) {
        CHECK(len == 1000, "len %zu", len);
        EXPECT(CC_OK, cc_bytes_move(data, len, back, &err));
        CHECK(memcmp(back, pattern, 1000) == 0, "moved");
    }

    cc_cmd cmd = 0;
    const char *cat_zero[] = {"/dev/zero"};
    EXPECT(CC_OK, cc_instance_command(inst, "cat", cat_zero, 1, &cmd, &err));
    int code = 0;
    expect_message(__LINE__, cc_cmd_output(cmd, &data, &len, &code, &err), CC_ERR_TOO_LARGE,
                   "more than 1048576 bytes");
    cc_cmd_free(cmd);
    const char *script[] = {"-c", "head -c 3000000 /dev/zero; echo done >&2"};
    EXPECT(CC_OK, cc_instance_command(inst, "sh", script, 2, &cmd, &err));
    uint64_t written = 0;
    EXPECT(CC_OK, cc_cmd_output_to_file(cmd, host_out, true, &written, &code, &err));
    CHECK(written == 3000005 && code == 0, "output_to_file: %llu, exit %d",
          (unsigned long long)written, code);
    cc_cmd_free(cmd);

    remove_tree(dir);
    free(dir);
    free(pattern);
    free(back);
    EXPECT(CC_OK, cc_instance_close(inst, &err));
    cc_instance_free(inst);
}

static void test_vm_in(const char *ref, const char *cache, int mounts, char *store);

static void test_vm(const char *ref, const char *cache, int mounts) {
    /* The image store (and the snapshots in it) lives until the end. */
    char *store = make_temp_dir("store");
    test_vm_in(ref, cache, mounts, store);
    remove_tree(store);
    free(store);
}

static void test_vm_in(const char *ref, const char *cache, int mounts, char *store) {
    cc_source src = pull_image(ref, store);
    if (!src)
        return;
    cc_instance_options opts = CC_INSTANCE_OPTIONS_INIT;
    opts.memory_mb = 256;
    opts.cpus = 1;
    cc_instance inst = 0;
    if (!EXPECT(CC_OK, cc_instance_new(src, &opts, &inst, &err))) {
        cc_source_free(src);
        return;
    }
    char *id = NULL;
    EXPECT(CC_OK, cc_instance_id(inst, &id, &err));
    CHECK(id && strlen(id) > 0, "instance id");
    bool running = false;
    EXPECT(CC_OK, cc_instance_is_running(inst, &running, &err));
    CHECK(running, "running");

    test_commands(inst);
    test_pipes_and_kill(inst);
    test_terminal(inst);
    test_files(inst);
    test_file_handles(inst);
    test_wait_cancel(inst);
    test_pause(inst);
    test_network(inst);
    test_warm_start(src, opts);
    test_park(src, opts);
    test_streaming_and_caps(src, opts);
    test_snapshot(inst, cache);
    if (mounts)
        test_mounts(src);
    else
        printf("api_test: host mounts not tested (the guest kernel has no 9p)\n");

    /* cc_shutdown from another thread closes what is still open (the
     * instance's run dir goes) and ends calls blocked on it. */
    /* Named <pid>.<process start time>-<id>. */
    char *pattern = NULL;
    if (asprintf(&pattern, "%s/run/%d.*-%s", cache, (int)getpid(), str_or(id, "?")) < 0)
        abort();
    glob_t found;
    char *run_dir = NULL;
    if (glob(pattern, 0, NULL, &found) == 0 && found.gl_pathc == 1)
        run_dir = strdup(found.gl_pathv[0]);
    globfree(&found);
    CHECK(run_dir && path_exists(run_dir), "run dir %s exists while running", pattern);
    free(pattern);
    if (!run_dir)
        abort();
    cc_cmd open_cmd = 0, sleeper = 0;
    EXPECT(CC_OK, cc_instance_command(inst, "true", NULL, 0, &open_cmd, &err));
    const char *hundred[] = {"100"};
    EXPECT(CC_OK, cc_instance_command(inst, "sleep", hundred, 1, &sleeper, &err));
    EXPECT(CC_OK, cc_cmd_start(sleeper, &err));
    pthread_t thread;
    pthread_create(&thread, NULL, shutdown_later, NULL);
    int code = 0;
    cc_error_code got = cc_cmd_wait(sleeper, &code, &err);
    /* Killed as the guest shuts down, or cut off with it. */
    CHECK((got == CC_OK && code < 0) || got == CC_ERR_NOT_RUNNING || got == CC_ERR_ALREADY_CLOSED,
          "a wait blocked during cc_shutdown ends: %d (exit code %d) %s", (int)got, code,
          got ? str_or(err.message, "") : "");
    if (got != CC_OK)
        cc_error_free(&err);
    pthread_join(thread, NULL);
    CHECK(shutdown_result == CC_OK, "cc_shutdown: %d", (int)shutdown_result);
    CHECK(!path_exists(run_dir), "run dir %s removed by cc_shutdown", run_dir);
    expect_message(__LINE__, cc_instance_is_running(inst, &running, &err), CC_ERR_INVALID_ARGUMENT,
                   "library not initialized: call cc_init");
    expect_message(__LINE__, cc_cmd_run(open_cmd, NULL, &err), CC_ERR_INVALID_ARGUMENT,
                   "library not initialized");
    CHECK(cc_instance_free(inst) == CC_OK, "freeing after shutdown is fine");
    CHECK(cc_cmd_free(open_cmd) == CC_OK && cc_cmd_free(sleeper) == CC_OK,
          "freeing after shutdown is fine");
    CHECK(cc_source_free(src) == CC_OK, "freeing after shutdown is fine");
    EXPECT(CC_OK, cc_init(&err));
    EXPECT(CC_ERR_INVALID_HANDLE, cc_instance_close(inst, &err));
    free(run_dir);
    cc_string_free(id);
}

int main(int argc, char **argv) {
    const char *ref = NULL, *cache = NULL;
    int mounts = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--vm") == 0 && i + 2 < argc) {
            ref = argv[++i];
            cache = argv[++i];
        } else if (strcmp(argv[i], "--mounts") == 0) {
            mounts = 1;
        } else {
            fprintf(stderr, "usage: %s [--vm REF CACHE_DIR [--mounts]]\n", argv[0]);
            return 2;
        }
    }
    test_before_init();
    test_library();
    test_null_arguments();
    test_handles();
    test_sources_and_clients();
    if (ref)
        test_vm(ref, cache, mounts);
    EXPECT(CC_OK, cc_shutdown(&err));
    EXPECT(CC_OK, cc_shutdown(NULL)); /* twice is fine */
    printf("api_test: %d checks, %d failed%s\n", checks, failures, ref ? " (with VMs)" : "");
    return failures ? 1 : 0;
}
