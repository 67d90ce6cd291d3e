/* hello.c: pull an image, boot it, run a command, move a file in and out. */
#include <cc.h>
#include <stdio.h>
#include <string.h>

static int failed(cc_error_code code, cc_error *err, const char *what) {
    if (code == CC_OK)
        return 0;
    fprintf(stderr, "%s: error %d: %s\n", what, (int)code, err->message);
    cc_error_free(err);
    return 1;
}

static int on_progress(const cc_pull_progress *p, void *user_data) {
    (void)user_data;
    if (p->total > 0)
        fprintf(stderr, "\rpulling %d%%", (int)(p->current * 100 / p->total));
    return 0; /* non-zero cancels the pull */
}

int main(int argc, char **argv) {
    const char *image = argc > 1 ? argv[1] : "alpine:latest";
    cc_error err = CC_ERROR_INIT;
    cc_oci_client client = 0;
    cc_source source = 0;
    cc_instance inst = 0;
    cc_cmd cmd = 0;
    uint8_t *data = NULL;
    size_t len = 0;
    int status = 1, exit_code = 0;

    if (failed(cc_init(&err), &err, "init"))
        return 1;
    if (failed(cc_oci_client_new(NULL, &client, &err), &err, "open the image store") ||
        failed(cc_oci_pull(client, image, NULL, on_progress, NULL, 0, &source, &err), &err,
               "pull"))
        goto out;
    fprintf(stderr, "\n");

    cc_instance_options options = CC_INSTANCE_OPTIONS_INIT; /* the rest zero: defaults */
    options.memory_mb = 256;
    if (failed(cc_instance_new(source, &options, &inst, &err), &err, "boot"))
        goto out;

    /* A non-zero exit status is not an error: it is returned. */
    const char *args[] = {"-c", "echo hello from $(uname -s); exit 3"};
    if (failed(cc_instance_command(inst, "sh", args, 2, &cmd, &err), &err, "command") ||
        failed(cc_cmd_output(cmd, &data, &len, &exit_code, &err), &err, "run"))
        goto out;
    printf("%.*s(exit status %d)\n", (int)len, (const char *)data, exit_code);
    cc_bytes_free(data);

    const char *note = "written from C\n";
    if (failed(cc_instance_write_file(inst, "/tmp/note.txt", (const uint8_t *)note, strlen(note),
                                      0644, &err),
               &err, "write") ||
        failed(cc_instance_read_file(inst, "/tmp/note.txt", &data, &len, &err), &err, "read"))
        goto out;
    printf("%.*s", (int)len, (const char *)data);
    cc_bytes_free(data);

    /* Errors carry a stable code, a message, the op and path, and the errno. */
    cc_file_info info;
    if (cc_instance_stat(inst, "/no/such/file", &info, &err) == CC_ERR_IO) {
        printf("%s failed on %s: %s (errno %d)\n", err.op, err.path, err.message, err.os_errno);
        cc_error_free(&err);
    }
    status = 0;

out:
    cc_cmd_free(cmd);
    cc_instance_free(inst); /* closes the instance */
    cc_source_free(source);
    cc_oci_client_free(client);
    cc_shutdown(NULL);
    return status;
}
