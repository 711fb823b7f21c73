// otaforge_improv.h: Improv Wi-Fi over the serial port (https://www.improv-wifi.com/serial/),
// so that ESP Web Tools can give the board its Wi-Fi network right after flashing it, instead
// of the network being built into the image.
//
// Plain C++ (no Arduino header): the firmware supplies the port and the Wi-Fi join through
// otaforge_improv::Device, and feeds every received byte to Serial::feed(). The same code is
// compiled on the host by OTAForge's tests and driven by the improv-wifi-serial-sdk that ESP
// Web Tools uses.
//
// Packets, both ways: "IMPROV" <version 1> <type> <length> <data...> <checksum>, the checksum
// being the low byte of the sum of every byte before it. The SDK ends each of its packets with
// a line feed; bytes outside packets (the firmware's own log lines) are skipped.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace otaforge_improv {

enum Type : uint8_t { CURRENT_STATE = 0x01, ERROR_STATE = 0x02, RPC = 0x03, RPC_RESULT = 0x04 };
enum State : uint8_t { READY = 0x02, PROVISIONING = 0x03, PROVISIONED = 0x04 };
enum Error : uint8_t {
  NO_ERROR = 0x00,
  INVALID_RPC = 0x01,
  UNKNOWN_RPC = 0x02,
  UNABLE_TO_CONNECT = 0x03,
};
enum Command : uint8_t { WIFI_SETTINGS = 0x01, GET_STATE = 0x02, GET_INFO = 0x03 };

// What the firmware provides.
class Device {
 public:
  virtual ~Device() {}
  // Writes bytes to the serial port.
  virtual void write(const uint8_t *bytes, size_t len) = 0;
  // Joins this network (and keeps it for the next boots); true once connected.
  virtual bool join(const char *ssid, const char *password) = 0;
  virtual bool connected() = 0;
  // Where the user goes next (sent after provisioning), e.g. the device's workspace.
  virtual const char *next_url() = 0;
  // Firmware name, its version, chip family ("ESP32", "ESP32-C3", "ESP8266"), device name.
  virtual const char *firmware() = 0;
  virtual const char *version() = 0;
  virtual const char *chip_family() = 0;
  virtual const char *device_name() = 0;
};

class Serial {
 public:
  explicit Serial(Device &device) : device_(device) {}

  // One byte from the port.
  void feed(uint8_t byte) {
    static const uint8_t kHeader[6] = {'I', 'M', 'P', 'R', 'O', 'V'};
    if (len_ < 6) {
      if (byte == kHeader[len_]) {
        buf_[len_++] = byte;
      } else {
        len_ = (byte == kHeader[0]) ? 1 : 0;
        if (len_) buf_[0] = byte;
      }
      return;
    }
    buf_[len_++] = byte;
    // header(6) version type length: the data length is known after 9 bytes.
    if (len_ < 9) return;
    const size_t total = 9 + (size_t)buf_[8] + 1;
    if (len_ < total) return;
    handle(total);
    len_ = 0;
  }

 private:
  void handle(size_t total) {
    uint8_t sum = 0;
    for (size_t i = 0; i + 1 < total; i++) sum = (uint8_t)(sum + buf_[i]);
    if (buf_[6] != 1) return;  // another protocol version: not for us
    if (sum != buf_[total - 1]) {
      send_error(INVALID_RPC);
      return;
    }
    if (buf_[7] != RPC) return;
    const uint8_t *data = buf_ + 9;
    const size_t data_len = buf_[8];
    if (data_len < 2 || (size_t)data[1] + 2 > data_len) {
      send_error(INVALID_RPC);
      return;
    }
    const uint8_t command = data[0];
    const uint8_t *args = data + 2;
    const size_t args_len = data[1];
    switch (command) {
      case GET_STATE:
        send_state(device_.connected() ? PROVISIONED : READY);
        if (device_.connected()) send_result(GET_STATE, device_.next_url(), nullptr);
        break;
      case GET_INFO: {
        const char *info[5] = {device_.firmware(), device_.version(), device_.chip_family(),
                               device_.device_name(), nullptr};
        send_strings(GET_INFO, info);
        break;
      }
      case WIFI_SETTINGS: {
        char ssid[33];
        char password[65];
        if (!read_string(args, args_len, 0, ssid, sizeof ssid) ||
            !read_string(args, args_len, 1 + (size_t)args[0], password, sizeof password)) {
          send_error(INVALID_RPC);
          return;
        }
        send_error(NO_ERROR);
        send_state(PROVISIONING);
        if (!device_.join(ssid, password)) {
          send_error(UNABLE_TO_CONNECT);
          send_state(READY);
          return;
        }
        send_state(PROVISIONED);
        send_result(WIFI_SETTINGS, device_.next_url(), nullptr);
        break;
      }
      default:
        send_error(UNKNOWN_RPC);
    }
  }

  // A length-prefixed string at `at` within args, into out (NUL-terminated).
  static bool read_string(const uint8_t *args, size_t args_len, size_t at, char *out, size_t cap) {
    if (at >= args_len) return false;
    const size_t n = args[at];
    if (at + 1 + n > args_len || n + 1 > cap) return false;
    memcpy(out, args + at + 1, n);
    out[n] = '\0';
    return true;
  }

  void send(uint8_t type, const uint8_t *data, size_t len) {
    uint8_t packet[9 + 255 + 2];
    const uint8_t header[9] = {'I', 'M', 'P', 'R', 'O', 'V', 1, type, (uint8_t)len};
    memcpy(packet, header, 9);
    memcpy(packet + 9, data, len);
    uint8_t sum = 0;
    for (size_t i = 0; i < 9 + len; i++) sum = (uint8_t)(sum + packet[i]);
    packet[9 + len] = sum;
    packet[10 + len] = '\n';
    device_.write(packet, 11 + len);
  }

  void send_state(uint8_t state) { send(CURRENT_STATE, &state, 1); }
  void send_error(uint8_t error) { send(ERROR_STATE, &error, 1); }

  void send_result(uint8_t command, const char *first, const char *second) {
    const char *strings[3] = {first, second, nullptr};
    send_strings(command, strings);
  }

  // An RPC result: command, total length, then each string length-prefixed.
  void send_strings(uint8_t command, const char *const *strings) {
    uint8_t data[255];
    size_t len = 2;
    for (size_t i = 0; strings[i]; i++) {
      size_t n = strlen(strings[i]);
      if (n > 250 - len) n = 250 - len;
      data[len++] = (uint8_t)n;
      memcpy(data + len, strings[i], n);
      len += n;
    }
    data[0] = command;
    data[1] = (uint8_t)(len - 2);
    send(RPC_RESULT, data, len);
  }

  Device &device_;
  uint8_t buf_[9 + 255 + 1];
  size_t len_ = 0;
};

}  // namespace otaforge_improv
