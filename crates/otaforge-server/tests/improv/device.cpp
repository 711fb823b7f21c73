// A host stand-in for the setup firmware's serial port, around the firmware's own
// otaforge_improv.h: bytes in on stdin, out on stdout (after a boot log line, as a board
// prints one), the network joined when it is HomeNet with the password right-pass, and the
// network kept in the file named by argv[1] (as the board keeps it in flash).
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "otaforge_improv.h"

class HostDevice : public otaforge_improv::Device {
 public:
  explicit HostDevice(const char *store) : store_(store) {}
  void write(const uint8_t *bytes, size_t len) override {
    fwrite(bytes, 1, len, stdout);
    fflush(stdout);
  }
  bool join(const char *ssid, const char *password) override {
    if (strcmp(ssid, "HomeNet") != 0 || strcmp(password, "right-pass") != 0) return false;
    FILE *f = fopen(store_, "w");
    if (!f) return false;
    fprintf(f, "%s\n%s\n", ssid, password);
    fclose(f);
    connected_ = true;
    return true;
  }
  bool connected() override { return connected_; }
  const char *next_url() override { return "http://127.0.0.1:8080/workspace/1/bot_001"; }
  const char *firmware() override { return "OTAForge setup"; }
  const char *version() override { return "setup-1"; }
  const char *chip_family() override { return "ESP32"; }
  const char *device_name() override { return "bot_001"; }

 private:
  const char *store_;
  bool connected_ = false;
};

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  HostDevice device(argv[1]);
  otaforge_improv::Serial improv(device);
  const char *boot = "[otaforge] OTAForge update client: device \"bot_001\"\r\n";
  device.write((const uint8_t *)boot, strlen(boot));
  unsigned char byte;
  while (read(0, &byte, 1) == 1) improv.feed(byte);
  return 0;
}
