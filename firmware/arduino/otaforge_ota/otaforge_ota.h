// otaforge_ota.h: keep the OTAForge update ability in any ESP32 / ESP8266 sketch.
//
// The platform links this header into every ESP sketch it compiles and wraps the sketch's
// setup() and loop() (linker --wrap) so that
//     otaforge_begin();   runs before setup()  (joins Wi-Fi, sets up the trigger button)
//     otaforge_loop();    runs after each loop() (button, timer, Wi-Fi reconnect; returns at once)
// and the firmware an OTA update installs can itself take the next update. A sketch may call
// them itself as well: otaforge_begin() does its work once, otaforge_loop() never blocks.
//
// A check GETs the device's static download link with the stock update client
// (ESP32: HTTPUpdate, ESP8266: ESP8266httpUpdate), sending the running version
// and the device ID/password as HTTP Basic authentication. The server answers
// 304 (nothing new) or 200 with the new .bin, which is written to the other
// OTA slot; the board then reboots into it.
//
// Settings: the OTAFORGE_* macros of otaforge_config.h (see that file). Include
// it before this header, or keep it next to this header (same folder).
//
// Needs: arduino-esp32 with HTTPUpdate::setAuthorization (2023 and later, every
// 3.x) or the ESP8266 core 3.x. Header-only; no other library.
#pragma once

#include <Arduino.h>

#if !defined(OTAFORGE_FIRMWARE_URL) && defined(__has_include)
#if __has_include("otaforge_config.h")
#include "otaforge_config.h"
#endif
#endif

#if !defined(OTAFORGE_WIFI_SSID) || !defined(OTAFORGE_WIFI_PASSWORD) || !defined(OTAFORGE_FIRMWARE_URL) || \
    !defined(OTAFORGE_DEVICE_ID) || !defined(OTAFORGE_DEVICE_PASSWORD) || !defined(OTAFORGE_TRIGGER_PIN) || \
    !defined(OTAFORGE_CHECK_INTERVAL_S) || !defined(OTAFORGE_FIRMWARE_VERSION)
#error "otaforge_ota.h: the OTAFORGE_* settings are missing; #include \"otaforge_config.h\" first"
#endif

#if defined(ESP32)
#include <WiFi.h>
#include <HTTPClient.h>
#include <HTTPUpdate.h>
#define OTAFORGE_UPDATER httpUpdate
#elif defined(ESP8266)
#include <ESP8266WiFi.h>
#include <ESP8266HTTPClient.h>
#include <ESP8266httpUpdate.h>
#define OTAFORGE_UPDATER ESPhttpUpdate
#else
#error "otaforge_ota.h supports ESP32 and ESP8266 boards only"
#endif

// ---- optional settings (override in otaforge_config.h) ----------------------
#ifndef OTAFORGE_LED_PIN
#define OTAFORGE_LED_PIN -1          // LED the update client blinks while flashing; -1 = none
#endif
#ifndef OTAFORGE_LED_ON
#define OTAFORGE_LED_ON HIGH
#endif
#ifndef OTAFORGE_FIRST_CHECK_S
#define OTAFORGE_FIRST_CHECK_S 30    // first timer check this long after Wi-Fi comes up; 0 = a full interval
#endif
#ifndef OTAFORGE_RETRY_S
#define OTAFORGE_RETRY_S 300         // after a failed check, try again sooner than the interval
#endif
#ifndef OTAFORGE_WIFI_WAIT_MS
#define OTAFORGE_WIFI_WAIT_MS 10000  // how long otaforge_begin() waits for Wi-Fi (0 = not at all)
#endif
#ifndef OTAFORGE_WIFI_RETRY_MS
#define OTAFORGE_WIFI_RETRY_MS 20000 // while Wi-Fi is down, restart the join this often
#endif
#ifndef OTAFORGE_DEBOUNCE_MS
#define OTAFORGE_DEBOUNCE_MS 50
#endif
#ifndef OTAFORGE_TRIGGER_ACTIVE
#define OTAFORGE_TRIGGER_ACTIVE LOW  // button pulls the pin to GND (internal pull-up)
#endif
#ifndef OTAFORGE_LOG
#define OTAFORGE_LOG Serial
#endif

#define OTAFORGE_LOGF(fmt, ...) OTAFORGE_LOG.printf("[otaforge] " fmt "\r\n", ##__VA_ARGS__)

namespace otaforge_detail {

// Longest interval that millis() arithmetic handles safely (about 23 days).
static const uint32_t kMaxIntervalS = 2000000UL;

inline uint32_t clampSeconds(uint32_t s) { return s > kMaxIntervalS ? kMaxIntervalS : s; }

struct State {
  bool wifiUp = false;
  bool everConnected = false;
  uint32_t lastJoinMs = 0;
  bool timerArmed = false;
  uint32_t nextCheckMs = 0;
  bool pending = false;        // a check was asked for while Wi-Fi was down
  int lastReading = HIGH;      // raw button level
  int stableLevel = HIGH;      // debounced button level
  uint32_t lastEdgeMs = 0;
  int lastPercent = -1;
  bool configured = false;
  bool begun = false;          // otaforge_begin() ran
};

// A literal only otaforge_begin() uses: the platform checks that every image it builds
// contains it, i.e. that the update client really is in the firmware.
#define OTAFORGE_CLIENT_MARKER "otaforge-update-client/1"
inline const char *volatile &clientMarker() {
  static const char *volatile marker = nullptr;
  return marker;
}

inline State &state() {
  static State s;
  return s;
}

inline bool looksConfigured() {
  // An unfilled template still holds its {{placeholders}}.
  if (strstr(OTAFORGE_FIRMWARE_URL, "{{") || strstr(OTAFORGE_WIFI_SSID, "{{") || strstr(OTAFORGE_DEVICE_ID, "{{")) {
    OTAFORGE_LOGF("otaforge_config.h still has {{placeholders}}: updates are off");
    return false;
  }
  if (strncmp(OTAFORGE_FIRMWARE_URL, "http://", 7) != 0) {
    OTAFORGE_LOGF("firmware URL must start with http:// (got \"%s\"): updates are off", OTAFORGE_FIRMWARE_URL);
    return false;
  }
  if (OTAFORGE_FIRMWARE_VERSION[0] == '\0') {
    OTAFORGE_LOGF("warning: empty OTAFORGE_FIRMWARE_VERSION, the server cannot answer \"no update\"");
  }
  return true;
}

// An empty OTAFORGE_WIFI_SSID: the network was given over Improv Wi-Fi and is kept in flash.
inline bool wifiFromFlash() { return OTAFORGE_WIFI_SSID[0] == '\0'; }

inline void joinWifi() {
  if (wifiFromFlash()) {
    WiFi.begin();  // the network kept in flash
  } else {
    WiFi.begin(OTAFORGE_WIFI_SSID, OTAFORGE_WIFI_PASSWORD);
  }
}

inline void armTimer(uint32_t now, uint32_t seconds) {
  State &s = state();
  seconds = clampSeconds(seconds);
  s.timerArmed = seconds > 0;
  s.nextCheckMs = now + seconds * 1000UL;
}

inline void onProgress(int done, int total) {
  State &s = state();
  if (total <= 0) return;
  const int pct = (int)((100LL * done) / total);
  if (pct == s.lastPercent) return;
  if (s.lastPercent < 0 || pct >= s.lastPercent + 10 || pct == 100) {  // every 10 %
    OTAFORGE_LOGF("flashing: %d%% (%d of %d bytes)", pct, done, total);
    s.lastPercent = pct;
  }
}

// Extra words for the errors a user can act on.
inline const char *hintFor(int err) {
  switch (err) {
    case HTTP_UE_SERVER_FILE_NOT_FOUND: return "no firmware published for this device yet (404)";
    case HTTP_UE_SERVER_FORBIDDEN: return "the platform refused this device (403): not verified yet, blocked or disabled";
    case HTTP_UE_SERVER_WRONG_HTTP_CODE: return "unexpected HTTP status (401 = wrong device ID/password; 409 = firmware built for another chip; 429 = too many wrong passwords, wait 5 minutes)";
    case HTTP_UE_SERVER_NOT_REPORT_SIZE: return "server sent no Content-Length";
    case HTTP_UE_TOO_LESS_SPACE: return "image larger than the OTA slot";
    case HTTP_UE_BIN_VERIFY_HEADER_FAILED: return "not an app image for this chip";
    case HTTP_UE_SERVER_FAULTY_MD5: return "x-MD5 from the server did not match";
#if defined(ESP8266)
    case -108: return "wrong device ID/password (401)";  // HTTP_UE_SERVER_UNAUTHORIZED
#endif
    default: return err < 0 && err > -100 ? "network error: is the server reachable from this Wi-Fi?" : "";
  }
}

}  // namespace otaforge_detail

// Check the download link now and flash if the server has newer firmware.
// Blocks only for the HTTP request (and the download when there is one).
// Returns HTTP_UPDATE_NO_UPDATES / HTTP_UPDATE_FAILED; on HTTP_UPDATE_OK the
// board restarts and this never returns.
inline t_httpUpdate_return otaforge_check_now() {
  using namespace otaforge_detail;
  State &s = state();
  const uint32_t now = millis();
  if (!s.configured) return HTTP_UPDATE_FAILED;
  if (WiFi.status() != WL_CONNECTED) {
    OTAFORGE_LOGF("check postponed: Wi-Fi not connected");
    s.pending = true;
    return HTTP_UPDATE_FAILED;
  }
  s.pending = false;
  s.lastPercent = -1;
  OTAFORGE_LOGF("checking %s (running \"%s\")", OTAFORGE_FIRMWARE_URL, OTAFORGE_FIRMWARE_VERSION);

  WiFiClient client;
  t_httpUpdate_return ret = OTAFORGE_UPDATER.update(client, String(OTAFORGE_FIRMWARE_URL), String(OTAFORGE_FIRMWARE_VERSION));
  switch (ret) {
    case HTTP_UPDATE_OK:
      OTAFORGE_LOGF("HTTP_UPDATE_OK: new firmware written, rebooting");
      OTAFORGE_LOG.flush();
      delay(200);
      ESP.restart();
      break;
    case HTTP_UPDATE_NO_UPDATES:
      OTAFORGE_LOGF("HTTP_UPDATE_NO_UPDATES: \"%s\" is the current firmware", OTAFORGE_FIRMWARE_VERSION);
      armTimer(now, OTAFORGE_CHECK_INTERVAL_S);
      break;
    case HTTP_UPDATE_FAILED:
    default: {
      const int err = OTAFORGE_UPDATER.getLastError();
      OTAFORGE_LOGF("HTTP_UPDATE_FAILED (%d): %s", err, OTAFORGE_UPDATER.getLastErrorString().c_str());
      const char *hint = hintFor(err);
      if (hint[0]) OTAFORGE_LOGF("  hint: %s", hint);
      // Try again sooner than the normal interval (never when the timer is off).
      const uint32_t interval = OTAFORGE_CHECK_INTERVAL_S;
      const uint32_t retry = OTAFORGE_RETRY_S;
      armTimer(now, interval == 0 ? 0 : (interval < retry ? interval : retry));
      break;
    }
  }
  return ret;
}

// Runs before setup() in platform builds; calling it again does nothing.
inline void otaforge_begin() {
  using namespace otaforge_detail;
  State &s = state();
  if (s.begun) return;
  s.begun = true;
  clientMarker() = OTAFORGE_CLIENT_MARKER;
  OTAFORGE_LOGF("OTAForge update client: device \"%s\", firmware \"%s\"", OTAFORGE_DEVICE_ID, OTAFORGE_FIRMWARE_VERSION);
  s.configured = looksConfigured();

#if OTAFORGE_TRIGGER_PIN >= 0
  pinMode(OTAFORGE_TRIGGER_PIN, OTAFORGE_TRIGGER_ACTIVE == LOW ? INPUT_PULLUP : INPUT);
  s.lastReading = s.stableLevel = digitalRead(OTAFORGE_TRIGGER_PIN);
  s.lastEdgeMs = millis();
  OTAFORGE_LOGF("trigger button on GPIO%d: press to check for new firmware", OTAFORGE_TRIGGER_PIN);
#endif

  OTAFORGE_UPDATER.rebootOnUpdate(false);  // we log, then restart ourselves
  OTAFORGE_UPDATER.setAuthorization(OTAFORGE_DEVICE_ID, OTAFORGE_DEVICE_PASSWORD);
#if OTAFORGE_LED_PIN >= 0
  OTAFORGE_UPDATER.setLedPin(OTAFORGE_LED_PIN, OTAFORGE_LED_ON);
#endif
  OTAFORGE_UPDATER.onProgress(otaforge_detail::onProgress);

  // Built-in credentials are not rewritten to flash at every boot; credentials given over
  // Improv live in flash, so their storage stays on.
  if (!wifiFromFlash()) WiFi.persistent(false);
  WiFi.mode(WIFI_STA);
  WiFi.setAutoReconnect(true);
  if (wifiFromFlash()) {
    OTAFORGE_LOGF("joining the Wi-Fi kept in flash (given over Improv Wi-Fi)");
  } else {
    OTAFORGE_LOGF("joining Wi-Fi \"%s\"", OTAFORGE_WIFI_SSID);
  }
  joinWifi();
  s.lastJoinMs = millis();

  const uint32_t start = millis();
  while (WiFi.status() != WL_CONNECTED && millis() - start < (uint32_t)OTAFORGE_WIFI_WAIT_MS) {
    delay(100);
  }
  if (WiFi.status() != WL_CONNECTED) OTAFORGE_LOGF("Wi-Fi not up yet; will keep trying in the background");
}

// Call at the top of loop(). Never waits: reads the button, looks at the
// clock and the Wi-Fi state, and only runs a check when one is due.
inline void otaforge_loop() {
  using namespace otaforge_detail;
  State &s = state();
  const uint32_t now = millis();

  // Wi-Fi: log changes, restart the join now and then while it is down.
  const bool up = WiFi.status() == WL_CONNECTED;
  if (up && !s.wifiUp) {
    s.wifiUp = true;
    OTAFORGE_LOGF("Wi-Fi connected: IP %s, RSSI %d dBm", WiFi.localIP().toString().c_str(), (int)WiFi.RSSI());
    if (!s.everConnected) {
      s.everConnected = true;
      armTimer(now, OTAFORGE_FIRST_CHECK_S > 0 ? (uint32_t)OTAFORGE_FIRST_CHECK_S : (uint32_t)OTAFORGE_CHECK_INTERVAL_S);
    }
  } else if (!up) {
    if (s.wifiUp) {
      s.wifiUp = false;
      s.lastJoinMs = now;
      OTAFORGE_LOGF("Wi-Fi lost; reconnecting");
    } else if (now - s.lastJoinMs >= (uint32_t)OTAFORGE_WIFI_RETRY_MS) {
      OTAFORGE_LOGF("Wi-Fi still down (status %d); joining \"%s\" again", (int)WiFi.status(), OTAFORGE_WIFI_SSID);
      WiFi.disconnect();
      joinWifi();
      s.lastJoinMs = now;
    }
  }

  bool due = false;

  // Trigger button, debounced: a check on each press (level becomes active).
#if OTAFORGE_TRIGGER_PIN >= 0
  const int reading = digitalRead(OTAFORGE_TRIGGER_PIN);
  if (reading != s.lastReading) {
    s.lastReading = reading;
    s.lastEdgeMs = now;
  } else if (reading != s.stableLevel && now - s.lastEdgeMs >= (uint32_t)OTAFORGE_DEBOUNCE_MS) {
    s.stableLevel = reading;
    if (reading == OTAFORGE_TRIGGER_ACTIVE) {
      OTAFORGE_LOGF("trigger button pressed");
      due = true;
    }
  }
#endif

  // Timer.
  if (s.timerArmed && (int32_t)(now - s.nextCheckMs) >= 0) {
    s.timerArmed = false;
    OTAFORGE_LOGF("scheduled check");
    due = true;
  }

  if (s.pending && up) due = true;  // asked for while offline

  if (due) {
    if (!s.configured) {
      OTAFORGE_LOGF("not checking: settings not filled in");
      return;
    }
    if (otaforge_check_now() != HTTP_UPDATE_OK && !s.timerArmed && !s.pending) {
      armTimer(millis(), OTAFORGE_CHECK_INTERVAL_S);
    }
  }
}
