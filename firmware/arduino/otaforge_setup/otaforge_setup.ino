// OTAForge setup firmware: flashed ONCE over USB/serial.
//
// It joins the user's Wi-Fi and checks the device's static download link
//  - when the trigger button is pressed (GPIO0 = BOOT/FLASH by default), and
//  - on a timer (30 s after Wi-Fi comes up, then every OTAFORGE_CHECK_INTERVAL_S),
// with the stock update client (ESP32: HTTPUpdate, ESP8266: ESP8266httpUpdate).
// When the platform has compiled newer firmware for this device, the board
// downloads it, flashes it into the other OTA slot and reboots into it.
// Every sketch the platform compiles includes otaforge_ota.h too, so the new
// firmware keeps this ability.
//
// All personal settings live in otaforge_config.h (filled in by the platform).
// Build: arduino-cli compile --fqbn esp32:esp32:esp32 --library ../otaforge_ota otaforge_setup
//        (or copy otaforge_ota.h next to this file); see ../README.md.

#include "otaforge_config.h"  // personal settings: Wi-Fi, link, device ID/password
#include "otaforge_ota.h"     // otaforge_begin() / otaforge_loop()
#include "otaforge_improv.h"  // Improv Wi-Fi over the serial port (ESP Web Tools)

// Improv Wi-Fi: after an install from the browser, ESP Web Tools asks for the network here;
// the board joins it and keeps it in flash, where every later firmware finds it.
class BoardImprov : public otaforge_improv::Device {
 public:
  void write(const uint8_t *bytes, size_t len) override { Serial.write(bytes, len); }
  bool join(const char *ssid, const char *password) override {
    WiFi.persistent(true);  // kept in flash for the next boots and the next firmware
    WiFi.disconnect();
    WiFi.begin(ssid, password);
    const uint32_t start = millis();
    while (WiFi.status() != WL_CONNECTED && millis() - start < 15000UL) delay(100);
    WiFi.persistent(false);
    return WiFi.status() == WL_CONNECTED;
  }
  bool connected() override { return WiFi.status() == WL_CONNECTED; }
  const char *next_url() override { return OTAFORGE_WORKSPACE_URL; }
  const char *firmware() override { return "OTAForge setup"; }
  const char *version() override { return OTAFORGE_FIRMWARE_VERSION; }
  const char *device_name() override { return OTAFORGE_DEVICE_ID; }
  const char *chip_family() override {
#if defined(ESP8266)
    return "ESP8266";
#elif defined(CONFIG_IDF_TARGET_ESP32S2)
    return "ESP32-S2";
#elif defined(CONFIG_IDF_TARGET_ESP32S3)
    return "ESP32-S3";
#elif defined(CONFIG_IDF_TARGET_ESP32C3)
    return "ESP32-C3";
#elif defined(CONFIG_IDF_TARGET_ESP32C6)
    return "ESP32-C6";
#elif defined(CONFIG_IDF_TARGET_ESP32H2)
    return "ESP32-H2";
#else
    return "ESP32";
#endif
  }
};

static BoardImprov board;
static otaforge_improv::Serial improv(board);

void setup() {
  Serial.begin(115200);
  delay(200);  // let the USB serial settle so the first lines are not lost
  Serial.println();
  Serial.println(F("OTAForge setup firmware"));
#if defined(ESP32)
  Serial.printf("chip %s rev %d, flash %u bytes, free OTA space %u bytes\r\n",
                ESP.getChipModel(), (int)ESP.getChipRevision(),
                (unsigned)ESP.getFlashChipSize(), (unsigned)ESP.getFreeSketchSpace());
#elif defined(ESP8266)
  Serial.printf("chip id %u, flash %u bytes, free OTA space %u bytes\r\n",
                (unsigned)ESP.getChipId(), (unsigned)ESP.getFlashChipRealSize(),
                (unsigned)ESP.getFreeSketchSpace());
#endif
  otaforge_begin();
}

void loop() {
  while (Serial.available() > 0) improv.feed((uint8_t)Serial.read());
  otaforge_loop();
  delay(10);  // nothing else to do; keeps the button sampling at ~100 Hz
}
